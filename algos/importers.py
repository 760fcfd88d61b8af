"""Importers: recordings in other tools' formats into the project's HDF5 layout.

    ALOHA / ACT   a folder of episode_*.hdf5 (or the files): /observations/qpos,
                  /observations/images/<camera> (raw [T, 480, 640, 3] uint8, or JPEG bytes
                  [T, max_len] padded with zeros when the root attribute ``compress`` is set),
                  /action, optional qvel and effort, root attribute ``sim``.
    robomimic     one file: data/demo_*/obs/<key>, actions, rewards, dones; mask/<filter_key>.
    LeRobot v3.0  a folder: meta/info.json, meta/episodes/*/*.parquet, data/*/*.parquet and
                  videos/<camera>/*/*.mp4 holding many episodes each (needs pyarrow and av).

Each format has a reader that lists its episodes from metadata alone (sources, lengths,
widths) and then reads one episode at a time; ``convert`` is the one path that turns any
reader's episodes into a dataset: images resized with anti-aliasing, rewards and episode
ends decided by ``episode_outcome``, labels into the per-episode table, all written
through ``DatasetWriter`` (temporary file, renamed when complete) and validated. Memory
is bounded by one episode at the output size plus one block of input frames.
"""
import glob
import io
import json
import os
import re
from dataclasses import dataclass, field

import h5py
import numpy as np
from PIL import Image
from tqdm import tqdm

from algos.experiment import StopFlag, UserError
from algos.hdf5_format import CHUNK_ROWS, IMAGE_KEYS, DatasetWriter, format_validation_report, inspect_hdf5

FRAME_BLOCK = 32          # input frames read and resized at a time
# Shrinking: Pillow first averages whole blocks of pixels (reduce by the largest integer factor,
# reducing_gap=1), then resamples bilinearly with the filter's support scaled to the remaining
# factor: anti-aliased, about area averaging, and 1.7x faster than bilinear over the whole factor.
RESAMPLE = Image.Resampling.BILINEAR
REDUCING_GAP = 1.0
ROBOMIMIC_OPERATOR_KEYS = ("worse", "okay", "better")   # filter keys of robomimic's mixed-human datasets

# One place per default: the cameras (left wrist, right wrist, global) and joint keys of each format.
DEFAULT_CAMERAS = {
    "aloha": ("cam_left_wrist", "cam_right_wrist", "cam_high"),
    "robomimic": ("robot0_eye_in_hand_image", "robot1_eye_in_hand_image", "agentview_image"),
    "lerobot": ("observation.images.cam_left_wrist", "observation.images.cam_right_wrist",
                "observation.images.cam_high"),
}
ALOHA_SIM_GLOBAL_CAMERA = "top"   # the ACT simulator's one camera: taken for the global view when cam_high is absent
DEFAULT_JOINT_KEYS = {"aloha": ("qpos",), "robomimic": ("robot0_joint_pos", "robot0_gripper_qpos"),
                      "lerobot": ("observation.state",)}
CHANNEL_ORDERS = ("rgb", "bgr")


@dataclass
class Episode:
    """One episode read from an input: low-dim arrays whole, camera frames in blocks."""

    joint: np.ndarray                 # [T, J] float32
    actions: np.ndarray               # [T, A] float32
    rewards: np.ndarray = None        # [T] the recording's own rewards, or None
    frames: object = None             # frames(view_index, size) -> iterator of uint8 [n, h, w, 3] RGB blocks
    labels: dict = field(default_factory=dict)   # operator, filter_keys, ...


# --------------------------------------------------------------------------- the shared path
def resize_block(block, size):
    """uint8 [n, h, w, 3] -> [n, H, W, 3] at ``size`` = (H, W), anti-aliased."""
    height, width = size
    if block.shape[1:3] == (height, width):
        return block
    return np.stack([np.asarray(Image.fromarray(frame).resize((width, height), RESAMPLE, reducing_gap=REDUCING_GAP))
                     for frame in block])


def parse_success_episodes(text, sources):
    """--success_episodes: 'all', 'none', indices and ranges ('0,3,5-9'), source names
    ('episode_3.hdf5', 'demo_12'), or a file holding such entries -> set of episode indices."""
    if os.path.isfile(text):
        with open(text) as f:
            text = f.read()
    entries = [e for e in re.split(r"[\s,]+", text.strip()) if e]
    if entries == ["all"]:
        return set(range(len(sources)))
    if entries == ["none"]:
        return set()
    by_name = {name: i for i, name in enumerate(sources)}
    chosen, unknown = set(), []
    for entry in entries:
        m = re.fullmatch(r"(\d+)(?:-(\d+))?", entry)
        if entry in by_name:
            chosen.add(by_name[entry])
        elif m and int(m.group(2) or m.group(1)) < len(sources):
            chosen.update(range(int(m.group(1)), int(m.group(2) or m.group(1)) + 1))
        else:
            unknown.append(entry)
    if unknown:
        raise UserError(f"--success_episodes: {', '.join(unknown)} name no episode: give 'all', 'none', episode "
                        f"indices 0..{len(sources) - 1} (ranges like 3-7) or sources such as {sources[0]!r}")
    return chosen


def episode_outcome(file_rewards, success, length):
    """Rewards and episode end of one episode -> (rewards [T], success).

    A success label (``success`` True/False, from --success_episodes) gives a sparse reward
    of 1 at the last row of a successful episode and 0 elsewhere. Without one, the
    recording's own rewards are kept and the episode succeeded when its last reward is
    positive; without either, every reward is 0 and the episode is no success. The
    caller ends a successful episode in a terminal, any other in a timeout.
    """
    if success is None and file_rewards is not None:
        return np.asarray(file_rewards, np.float32).reshape(length), bool(file_rewards[-1] > 0)
    rewards = np.zeros(length, np.float32)
    rewards[-1] = float(bool(success))
    return rewards, bool(success)


def convert(reader, output, image_size, success_episodes=None, progress=True):
    """Write every episode of ``reader`` to ``output`` in the project's layout and validate it.

    Returns the validation summary and the lines saying what was assumed.
    """
    sources, lengths = reader.sources, reader.lengths
    if not sources:
        raise UserError(f"{reader.path}: no episodes found")
    empty = [source for source, length in zip(sources, lengths) if length < 1]
    if empty:
        raise UserError(f"{reader.path}: episode(s) without rows: {', '.join(empty)}")
    labelled = parse_success_episodes(success_episodes, sources) if success_episodes is not None else None
    if labelled is not None:
        reward_rule = (f"success labelled by --success_episodes ({len(labelled)} of {len(sources)} episodes): reward 1 "
                       "at the last row of a successful episode, 0 elsewhere; the input's own rewards are not used")
    elif reader.has_rewards:
        reward_rule = ("the input's own rewards; an episode whose last reward is positive counts as a success")
    else:
        reward_rule = ("the input has no rewards and no --success_episodes was given: every reward is 0 and no "
                       "episode is a success, so training has no return to learn from; label successes with "
                       "--success_episodes")
    assumptions = [f"rewards: {reward_rule}",
                   "episode ends: a successful episode ends in a terminal, any other in a timeout",
                   f"images: resized from the input's size to {image_size[0]}x{image_size[1]} (Pillow: block "
                   f"averaging, then {RESAMPLE.name.lower()}; anti-aliased); joint and action widths kept",
                   *reader.assumptions]
    attrs = {"created_by": f"create_dataset.py --from_{reader.format}", "source_format": reader.format,
             "source_path": str(reader.path), "camera_map": json.dumps(dict(zip(IMAGE_KEYS, reader.cameras))),
             "joint_keys": json.dumps(list(reader.joint_keys)), "assumptions": json.dumps(assumptions)}
    writer = DatasetWriter(output, int(sum(lengths)), image_size, reader.joint_dim, reader.action_dim, attrs,
                           chunk_rows=CHUNK_ROWS)
    bar = tqdm(total=int(sum(lengths)), desc=f"Converting {os.path.basename(str(reader.path))}", unit="frame",
               disable=not progress)
    # Ctrl-C and SIGTERM are noted by the handler and acted on between blocks of frames: a
    # KeyboardInterrupt raised inside h5py's clean-up callbacks would be swallowed, and the
    # conversion would go on.
    stopping = f"stopping the conversion; {output} is not written (send it again to stop at once)"
    try:
        with StopFlag(stopping) as stop:
            for index, (source, length) in enumerate(zip(sources, lengths)):
                try:
                    rows, labels = _episode_rows(reader, index, image_size, labelled, stop)
                except (OSError, KeyError) as exc:   # how h5py and pyarrow report an unreadable file
                    raise UserError(f"{reader.path}: {source}: cannot be read (truncated or corrupt file?): "
                                    f"{exc}") from None
                writer.write(rows)
                writer.add_episode(length, source=source, success=bool(rows["terminals"][-1]), **labels)
                bar.update(length)
        bar.close()
        writer.close()
    except BaseException:
        bar.close()
        writer.abort()
        raise
    summary = inspect_hdf5(output)
    if not summary.ok:   # e.g. NaN in the input's joints: a file training would refuse is not left behind
        os.remove(output)
        raise UserError(f"{reader.path}: the converted data does not validate, nothing was written:\n"
                        + "\n".join(f"  - {p}" for p in summary.problems))
    return summary, assumptions


def _episode_rows(reader, index, image_size, labelled, stop):
    """One episode in the file's keys (resized views, rewards, the episode's end) and its labels."""
    source, length = reader.sources[index], reader.lengths[index]
    episode = reader.read(index)
    for key, value in (("joint", episode.joint), ("actions", episode.actions), ("rewards", episode.rewards)):
        if value is not None and len(value) != length:
            raise UserError(f"{reader.path}: {source}: {key} has {len(value)} rows, the episode has {length}")
    success = None if labelled is None else index in labelled
    rewards, success = episode_outcome(episode.rewards, success, length)
    rows = {"joint": episode.joint, "actions": episode.actions, "rewards": rewards,
            "terminals": np.zeros(length, bool), "timeouts": np.zeros(length, bool)}
    rows["terminals" if success else "timeouts"][-1] = True
    for view_index, view in enumerate(IMAGE_KEYS):
        blocks = []
        for block in episode.frames(view_index, image_size):
            if stop():
                raise KeyboardInterrupt
            blocks.append(resize_block(block, image_size))
        rows[view] = np.concatenate(blocks) if blocks else np.zeros((0, *image_size, 3), np.uint8)
        if len(rows[view]) != length:
            raise UserError(f"{reader.path}: {source}: camera {reader.cameras[view_index]!r} has "
                            f"{len(rows[view])} frames, the episode has {length} rows")
    return rows, episode.labels


def report(summary, assumptions):
    """What create_dataset.py prints after an import."""
    lines = ["Assumed / 假设:"] + [f"  - {a}" for a in assumptions] + ["", format_validation_report(summary)]
    return "\n".join(lines)


def _missing(path, what, wanted, have):
    missing = [k for k in wanted if k not in have]
    if missing:
        raise UserError(f"{path}: {what} {', '.join(map(repr, missing))} not found; it has: "
                        f"{', '.join(sorted(have)) or '(nothing)'}")


def _width(dset):
    """Columns a low-dim dataset [T, ...] adds (1 for [T])."""
    return int(np.prod(dset.shape[1:]))


def _rows(dset):
    """A low-dim dataset as float32 [T, width]."""
    return np.asarray(dset, np.float32).reshape(dset.shape[0], -1)


def _block_iter(dset, block=FRAME_BLOCK):
    for start in range(0, dset.shape[0], block):
        yield np.asarray(dset[start:start + block])


def _natural_key(path):
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", os.path.basename(path))]


# --------------------------------------------------------------------------- ALOHA / ACT
class AlohaReader:
    """ALOHA / ACT per-episode files (record_episodes.py, record_sim_episodes.py).

    Channel order: ALOHA stores the camera arrays as its drivers deliver them (RGB) and, in
    the compressed layout, encodes them with ``cv2.imencode``, which takes its input as
    BGR; ``cv2.imdecode`` gives the stored arrays back. This tool decodes the JPEG bytes
    with Pillow, which reads them as a standard JPEG, and swaps the channels so that the
    result equals what ``cv2.imdecode`` returns. ``channel_order`` says what the stored
    arrays hold: ``rgb`` (the default, ALOHA's) or ``bgr`` (a rig that stored OpenCV
    images), which is reversed to RGB.
    """

    format = "aloha"

    def __init__(self, paths, cameras=None, joint_keys=None, channel_order="rgb"):
        self.path = ", ".join(map(str, paths)) if len(paths) > 1 else str(paths[0])
        self.files = []
        for path in map(str, paths):
            if os.path.isdir(path):
                found = sorted(glob.glob(os.path.join(glob.escape(path), "episode_*.hdf5")), key=_natural_key)
                if not found:
                    raise UserError(f"{path}: no episode_*.hdf5 files in this folder")
                self.files += found
            elif os.path.isfile(path):
                self.files.append(path)
            else:
                raise UserError(f"{path}: no such file or folder")
        self.channel_order = channel_order
        self.joint_keys = tuple(joint_keys or DEFAULT_JOINT_KEYS["aloha"])
        self.sources = [os.path.basename(p) for p in self.files]
        self.lengths = []
        self.cameras = tuple(cameras) if cameras else None
        for path in self.files:
            self._inspect(path)
        self.has_rewards = False
        self.assumptions = [f"cameras: {dict(zip(IMAGE_KEYS, self.cameras))}; joint: "
                            f"/observations/{' + /observations/'.join(self.joint_keys)}; actions: /action",
                            f"channel order of the stored camera arrays: {self.channel_order} "
                            "(--aloha_channel_order; JPEG bytes are taken as written by cv2.imencode)"]

    def _inspect(self, path):
        try:
            f = h5py.File(path, "r")
        except OSError as exc:
            raise UserError(f"{path}: not a readable HDF5 file ({exc})") from None
        with f:
            have = sorted(f.keys())
            _missing(path, "key", ("observations", "action"), have)
            obs = f["observations"]
            _missing(path, "key", ["observations/" + k for k in self.joint_keys + ("images",)],
                     ["observations/" + k for k in obs.keys()])
            images = obs["images"]
            if self.cameras is None:
                left, right, top = DEFAULT_CAMERAS["aloha"]
                if top not in images and ALOHA_SIM_GLOBAL_CAMERA in images:
                    top = ALOHA_SIM_GLOBAL_CAMERA
                self.cameras = (left, right, top)
            missing = [c for c in self.cameras if c not in images]
            if missing:
                raise UserError(f"{path}: camera {', '.join(missing)} not in observations/images; it has: "
                                f"{', '.join(sorted(images))}. Map the three views with --cameras LEFT RIGHT GLOBAL "
                                "(a name may repeat)")
            length = f["action"].shape[0]
            self.lengths.append(length)
            widths = (sum(_width(obs[k]) for k in self.joint_keys), _width(f["action"]))
            if len(self.lengths) == 1:
                self.joint_dim, self.action_dim = widths
            elif widths != (self.joint_dim, self.action_dim):
                raise UserError(f"{path}: joint/action widths {widths} differ from {self.files[0]}'s "
                                f"{(self.joint_dim, self.action_dim)}")
            # the layout is read off each camera's shape: the attribute ``compress`` is also set by
            # recorders that keep raw frames in gzip-compressed datasets
            for camera in self.cameras:
                dset = images[camera]
                if dset.dtype != np.uint8 or not (dset.ndim == 2 or (dset.ndim == 4 and dset.shape[3] == 3)):
                    raise UserError(f"{path}: observations/images/{camera}: {dset.dtype} {dset.shape}, expected "
                                    "uint8 [T, H, W, 3] frames or [T, max_len] JPEG bytes")
                if dset.shape[0] != length:
                    raise UserError(f"{path}: observations/images/{camera}: {dset.shape[0]} frames, /action has "
                                    f"{length} rows")

    def read(self, index):
        path = self.files[index]
        with h5py.File(path, "r") as f:
            joint = np.concatenate([_rows(f["observations"][k]) for k in self.joint_keys], axis=1)
            actions = _rows(f["action"])

        def frames(view_index, size):
            camera = self.cameras[view_index]
            with h5py.File(path, "r") as f:
                dset = f["observations/images"][camera]
                for block in _block_iter(dset):
                    if dset.ndim == 2:   # JPEG bytes
                        block = np.stack([self._decode_jpeg(path, camera, row, size) for row in block])
                    yield block[..., ::-1] if self.channel_order == "bgr" else block

        return Episode(joint, actions, frames=frames)

    def _decode_jpeg(self, path, camera, padded, size):
        """One zero-padded JPEG (the decoder stops at its end marker) -> the array cv2.imdecode returns."""
        try:
            image = Image.open(io.BytesIO(padded.tobytes()))
            image.draft("RGB", (size[1], size[0]))   # decode at 1/2, 1/4 or 1/8 scale when still >= size
            decoded = np.asarray(image.convert("RGB"))
        except (OSError, ValueError) as exc:
            raise UserError(f"{path}: observations/images/{camera}: a frame is not a JPEG image ({exc})") from None
        return np.ascontiguousarray(decoded[..., ::-1])   # cv2.imencode wrote the arrays' channels swapped


# --------------------------------------------------------------------------- robomimic
class RobomimicReader:
    """A robomimic HDF5 file: demos sorted by number as robomimic does; filter keys as labels."""

    format = "robomimic"

    def __init__(self, path, cameras=None, joint_keys=None):
        self.path = str(path)
        self.cameras = tuple(cameras or DEFAULT_CAMERAS["robomimic"])
        self.joint_keys = tuple(joint_keys or DEFAULT_JOINT_KEYS["robomimic"])
        if not os.path.isfile(self.path):
            raise UserError(f"{self.path}: no such file")
        try:
            f = h5py.File(self.path, "r")
        except OSError as exc:
            raise UserError(f"{self.path}: not a readable HDF5 file ({exc})") from None
        with f:
            _missing(self.path, "key", ("data",), list(f.keys()))
            self.demos = sorted((k for k in f["data"] if k.startswith("demo_")), key=_natural_key)
            self.lengths, self.has_rewards = [], True
            for demo in self.demos:
                group = f["data"][demo]
                _missing(self.path, "key", [f"data/{demo}/actions", f"data/{demo}/obs"],
                         [f"data/{demo}/{k}" for k in group.keys()])
                _missing(self.path, "observation key", [f"data/{demo}/obs/{k}" for k in self.cameras + self.joint_keys],
                         [f"data/{demo}/obs/{k}" for k in group["obs"].keys()])
                self.lengths.append(group["actions"].shape[0])
                self.has_rewards &= "rewards" in group
            if self.demos:
                first = f["data"][self.demos[0]]
                self.joint_dim = sum(_width(first["obs"][k]) for k in self.joint_keys)
                self.action_dim = _width(first["actions"])
            self.filter_keys = {}
            for key in f.get("mask", {}):
                for demo in np.asarray(f["mask"][key][:]):
                    self.filter_keys.setdefault(demo.decode() if isinstance(demo, bytes) else str(demo), []).append(key)
        self.sources = list(self.demos)
        operators = sorted({k for keys in self.filter_keys.values() for k in keys if k in ROBOMIMIC_OPERATOR_KEYS})
        self.assumptions = [f"cameras: {dict(zip(IMAGE_KEYS, self.cameras))}; joint: obs/"
                            f"{' + obs/'.join(self.joint_keys)} (concatenated in this order); actions: actions",
                            f"labels: the file's filter keys (mask/*) per demo; operator from "
                            f"{', '.join(operators) if operators else 'none of ' + '/'.join(ROBOMIMIC_OPERATOR_KEYS)}"]

    def read(self, index):
        demo = self.demos[index]
        with h5py.File(self.path, "r") as f:
            group = f["data"][demo]
            joint = np.concatenate([_rows(group["obs"][k]) for k in self.joint_keys], axis=1)
            actions = _rows(group["actions"])
            rewards = np.asarray(group["rewards"], np.float32) if "rewards" in group else None
        keys = sorted(self.filter_keys.get(demo, []))
        labels = {"operator": ",".join(k for k in keys if k in ROBOMIMIC_OPERATOR_KEYS), "filter_keys": ",".join(keys)}

        def frames(view_index, size):
            with h5py.File(self.path, "r") as f:
                dset = f["data"][demo]["obs"][self.cameras[view_index]]
                if dset.ndim != 4 or dset.shape[3] != 3 or dset.dtype != np.uint8:
                    raise UserError(f"{self.path}: data/{demo}/obs/{self.cameras[view_index]}: {dset.dtype} "
                                    f"{dset.shape}, expected uint8 images [T, H, W, 3]")
                yield from _block_iter(dset)

        return Episode(joint, actions, rewards, frames, labels)


# --------------------------------------------------------------------------- LeRobot v3.0
LEROBOT_VERSION = "v3.0"
LEROBOT_REWARD_KEY = "next.reward"


def _lerobot_modules():
    try:
        import av
        import pyarrow.parquet as pq
    except ImportError as exc:
        raise UserError(f"--from_lerobot needs the packages pyarrow and av ({exc.name} is missing): "
                        "pip install pyarrow av") from None
    return pq, av


class LeRobotReader:
    """A local LeRobot v3.0 dataset: episodes located through meta/episodes, frames decoded from
    the shared mp4 files starting at each episode's ``from_timestamp`` (cameras of dtype
    'video'), or from the encoded images in the data files' rows (dtype 'image')."""

    format = "lerobot"

    def __init__(self, root, cameras=None, joint_keys=None):
        self.pq, self.av = _lerobot_modules()
        self.path = str(root)
        info_path = os.path.join(self.path, "meta", "info.json")
        if not os.path.isfile(info_path):
            raise UserError(f"{self.path}: no meta/info.json: not a LeRobot dataset folder")
        with open(info_path) as f:
            self.info = json.load(f)
        version = str(self.info.get("codebase_version", "(none)"))
        if version != LEROBOT_VERSION:
            first = ("; it goes to v2.1 first with python -m lerobot.datasets.v21.convert_dataset_v20_to_v21"
                     if version.startswith(("v1", "v2.0")) else "")
            raise UserError(f"{info_path}: codebase_version {version}; this tool reads LeRobot {LEROBOT_VERSION}. "
                            "Convert the dataset with LeRobot's converter: python -m "
                            "lerobot.datasets.v30.convert_dataset_v21_to_v30 --repo-id=<your dataset> (the module is "
                            f"lerobot.scripts.convert_dataset_v21_to_v30 in newer LeRobot releases){first}")
        features = self.info.get("features", {})
        self.cameras = tuple(self._feature_name(c, features) for c in (cameras or DEFAULT_CAMERAS["lerobot"]))
        self.joint_keys = tuple(self._feature_name(k, features) for k in (joint_keys or DEFAULT_JOINT_KEYS["lerobot"]))
        _missing(info_path, "feature", self.cameras + self.joint_keys + ("action",), features)
        for camera in self.cameras:
            if features[camera].get("dtype") not in ("video", "image"):
                raise UserError(f"{info_path}: feature {camera!r} has dtype {features[camera].get('dtype')!r}; "
                                "a camera is a 'video' or an 'image' feature")
        # 'image' features are encoded images in the data files' rows; 'video' ones live in the mp4 files
        self.image_cameras = {c for c in self.cameras if features[c]["dtype"] == "image"}
        self.joint_dim = sum(int(np.prod(features[k]["shape"])) for k in self.joint_keys)
        self.action_dim = int(np.prod(features["action"]["shape"]))
        self.has_rewards = LEROBOT_REWARD_KEY in features
        files = sorted(glob.glob(os.path.join(glob.escape(self.path), "meta", "episodes", "*", "*.parquet")))
        if not files:
            raise UserError(f"{self.path}: no meta/episodes/*/*.parquet files")
        columns = ["episode_index", "length", "data/chunk_index", "data/file_index"] + [
            f"videos/{c}/{k}" for c in set(self.cameras) - self.image_cameras
            for k in ("chunk_index", "file_index", "from_timestamp")]
        rows = []
        for path in files:
            have = self.pq.read_schema(path).names
            _missing(path, "column", columns, have)
            rows += self.pq.read_table(path, columns=columns).to_pylist()
        self.episodes = sorted(rows, key=lambda r: r["episode_index"])
        self.sources = [f"episode_{r['episode_index']}" for r in self.episodes]
        self.lengths = [int(r["length"]) for r in self.episodes]
        self.fps = float(self.info["fps"])
        self.assumptions = [f"cameras: {dict(zip(IMAGE_KEYS, self.cameras))}; joint: "
                            f"{' + '.join(self.joint_keys)}; actions: action; {self.fps:g} fps"]

    @staticmethod
    def _feature_name(name, features):
        """'cam_high' stands for 'observation.images.cam_high', 'state' for 'observation.state'."""
        for candidate in (name, f"observation.images.{name}", f"observation.{name}"):
            if candidate in features:
                return candidate
        return name

    def read(self, index):
        episode = self.episodes[index]
        data_path = os.path.join(self.path, self.info["data_path"].format(
            chunk_index=episode["data/chunk_index"], file_index=episode["data/file_index"]))
        columns = list(self.joint_keys) + ["action"] + ([LEROBOT_REWARD_KEY] if self.has_rewards else []) + sorted(
            self.image_cameras)
        if not os.path.isfile(data_path):
            raise UserError(f"{data_path}: missing (episode {episode['episode_index']}'s data file)")
        columns += ["episode_index", "frame_index"]
        _missing(data_path, "column", columns, self.pq.read_schema(data_path).names)
        table = self.pq.read_table(data_path, columns=columns,
                                   filters=[("episode_index", "==", episode["episode_index"])])
        table = table.sort_by("frame_index")

        def column(name):
            return np.asarray(table[name].to_pylist(), np.float32).reshape(table.num_rows, -1)

        joint = np.concatenate([column(k) for k in self.joint_keys], axis=1)
        rewards = column(LEROBOT_REWARD_KEY).reshape(-1) if self.has_rewards else None

        def frames(view_index, size):
            camera = self.cameras[view_index]
            if camera in self.image_cameras:
                images = table[camera].to_pylist()
                for start in range(0, len(images), FRAME_BLOCK):
                    yield np.stack([_decode_image(data_path, camera, image["bytes"])
                                    for image in images[start:start + FRAME_BLOCK]])
                return
            video = os.path.join(self.path, self.info["video_path"].format(
                video_key=camera, chunk_index=episode[f"videos/{camera}/chunk_index"],
                file_index=episode[f"videos/{camera}/file_index"]))
            yield from self._decode(video, float(episode[f"videos/{camera}/from_timestamp"]), int(episode["length"]))

        return Episode(joint, column("action"), rewards, frames)

    def _decode(self, video, start, length):
        """``length`` RGB frames of ``video`` from ``start`` seconds on, in blocks."""
        if not os.path.isfile(video):
            raise UserError(f"{video}: missing")
        try:
            container = self.av.open(video)
        except self.av.error.FFmpegError as exc:
            raise UserError(f"{video}: cannot be read as a video ({exc})") from None
        block, done = [], 0
        try:
            with container:
                stream = container.streams.video[0]
                container.seek(int(start / stream.time_base), stream=stream, backward=True, any_frame=False)
                for frame in container.decode(stream):
                    if frame.time is not None and frame.time < start - 0.5 / self.fps:
                        continue   # frames before the episode, from the key frame the seek landed on
                    block.append(frame.to_ndarray(format="rgb24"))
                    done += 1
                    if len(block) == FRAME_BLOCK or done == length:
                        yield np.stack(block)
                        block = []
                    if done == length:
                        return
        except self.av.error.FFmpegError as exc:
            raise UserError(f"{video}: cannot be decoded after {done} of the episode's frames ({exc})") from None
        raise UserError(f"{video}: ended after {done} of the episode's {length} frames from {start:.3f} s")


def _decode_image(path, key, data):
    """One encoded image (PNG, JPEG) -> uint8 RGB [H, W, 3]."""
    try:
        return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
    except (OSError, ValueError, TypeError) as exc:
        raise UserError(f"{path}: {key}: a frame is not an image ({exc})") from None


def make_reader(fmt, source, cameras=None, joint_keys=None, channel_order="rgb"):
    """The reader of one input format, as create_dataset.py's --from_* flags name it."""
    if cameras is not None and len(cameras) != 3:
        raise UserError(f"--cameras takes three names (left wrist, right wrist, global), got {len(cameras)}")
    if fmt == "aloha":
        return AlohaReader(source, cameras, joint_keys, channel_order)
    if fmt == "robomimic":
        return RobomimicReader(source, cameras, joint_keys)
    if fmt == "lerobot":
        return LeRobotReader(source, cameras, joint_keys)
    raise ValueError(fmt)
