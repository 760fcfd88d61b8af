"""Small recordings in other tools' formats, written as those tools write them, for the
importer tests and benchmarks/convert_speed.py.

Camera content is checkable after conversion: each camera is one saturated colour
(CAMERA_COLOURS, in the order left wrist, right wrist, global) whose brightness rises with
the frame's index in the recording (``shade``), so a test can tell which camera, which
episode and which frame ended up where.
"""
import io
import json
import os

import h5py
import numpy as np
from PIL import Image

ALOHA_CAMERAS = ("cam_high", "cam_left_wrist", "cam_right_wrist", "cam_low")   # ALOHA's recording order
CAMERA_COLOURS = {"left": (1, 0, 0), "right": (0, 1, 0), "global": (0, 0, 1)}   # RGB
ALOHA_VIEW_OF = {"cam_left_wrist": "left", "cam_right_wrist": "right", "cam_high": "global", "top": "global",
                 "cam_low": "right"}


def shade(frame):
    """The brightness of a recording's frame number ``frame`` (frames counted across episodes)."""
    return 60 + (7 * frame) % 190


def camera_frames(view, first_frame, length, size):
    """[length, H, W, 3] uint8 RGB: ``view``'s colour at each frame's shade, a darker bar at the top."""
    h, w = size
    colour = np.array(CAMERA_COLOURS[view], np.float32)
    frames = np.zeros((length, h, w, 3), np.uint8)
    for t in range(length):
        frames[t] = (colour * shade(first_frame + t)).astype(np.uint8)
        frames[t, : h // 8] //= 2
    return frames


def jpeg_as_cv2_writes(rgb):
    """The bytes ``cv2.imencode('.jpg', rgb)`` writes: it takes its input as BGR."""
    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(rgb[..., ::-1])).save(buffer, "JPEG", quality=50)
    return np.frombuffer(buffer.getvalue(), np.uint8)


def aloha_camera_frames(camera, first_frame, length, size):
    return camera_frames(ALOHA_VIEW_OF[camera], first_frame, length, size)


def write_aloha_episode(path, length=20, first_frame=0, cameras=ALOHA_CAMERAS, size=(480, 640), compress=False,
                        sim=False, dim=14, seed=0, frames_of=aloha_camera_frames):
    """One episode_*.hdf5 as ALOHA's record_episodes.py (or ACT's record_sim_episodes.py) writes it;
    ``frames_of(camera, first_frame, length, size)`` makes each camera's frames."""
    rng = np.random.default_rng(seed)
    with h5py.File(path, "w", rdcc_nbytes=1024 ** 2 * 2) as root:
        root.attrs["sim"] = sim
        if not sim:
            root.attrs["compress"] = compress
        obs = root.create_group("observations")
        image = obs.create_group("images")
        encoded = {}
        for cam in cameras:
            frames = frames_of(cam, first_frame, length, size)
            if compress:
                encoded[cam] = [jpeg_as_cv2_writes(f) for f in frames]
            else:
                image.create_dataset(cam, data=frames, chunks=(1, *size, 3))
        if compress:
            compress_len = np.array([[len(e) for e in encoded[cam]] for cam in cameras])
            padded_size = compress_len.max()
            for cam in cameras:
                padded = np.zeros((length, padded_size), np.uint8)
                for t, e in enumerate(encoded[cam]):
                    padded[t, :len(e)] = e
                image.create_dataset(cam, data=padded, chunks=(1, padded_size))
            root.create_dataset("compress_len", data=compress_len.astype(np.float32))
        qpos = np.cumsum(rng.normal(0, 0.01, (length, dim)), 0).astype(np.float32)
        obs.create_dataset("qpos", data=qpos)
        obs.create_dataset("qvel", data=np.diff(qpos, axis=0, prepend=qpos[:1]).astype(np.float32))
        if not sim:
            obs.create_dataset("effort", data=rng.normal(size=(length, dim)).astype(np.float32))
            root.create_dataset("base_action", data=np.zeros((length, 2), np.float32))
        root.create_dataset("action", data=(qpos + 0.01).astype(np.float32))
    return path


def write_aloha_folder(folder, n_episodes=3, length=12, **kw):
    """episode_0.hdf5 ... episode_{n-1}.hdf5; frames counted across episodes for ``shade``."""
    os.makedirs(folder, exist_ok=True)
    for e in range(n_episodes):
        write_aloha_episode(os.path.join(folder, f"episode_{e}.hdf5"), length, first_frame=e * length, seed=e, **kw)
    return folder


ROBOMIMIC_CAMERAS = {"robot0_eye_in_hand_image": "left", "robot1_eye_in_hand_image": "right",
                     "agentview_image": "global"}


def write_robomimic(path, lengths=(8, 10, 6, 9), size=(16, 16), masks=None, rewards=True):
    """A robomimic dataset: data/demo_i with obs, actions, rewards, dones; mask/<filter key>."""
    masks = masks if masks is not None else {"worse": ["demo_0"], "okay": ["demo_1", "demo_2"], "better": ["demo_3"],
                                             "train": ["demo_0", "demo_1", "demo_3"], "valid": ["demo_2"]}
    rng = np.random.default_rng(0)
    first = 0
    with h5py.File(path, "w") as f:
        data = f.create_group("data")
        data.attrs["total"] = sum(lengths)
        data.attrs["env_args"] = json.dumps({"env_name": "TwoArmTransport", "type": 1, "env_kwargs": {}})
        for i, n in enumerate(lengths):
            demo = data.create_group(f"demo_{i}")
            demo.attrs["num_samples"] = n
            obs = demo.create_group("obs")
            for key, view in ROBOMIMIC_CAMERAS.items():
                obs.create_dataset(key, data=camera_frames(view, first, n, size))
            obs.create_dataset("robot0_joint_pos", data=rng.normal(size=(n, 7)))
            obs.create_dataset("robot0_gripper_qpos", data=rng.normal(size=(n, 2)))
            obs.create_dataset("robot0_eef_pos", data=rng.normal(size=(n, 3)))
            demo.create_dataset("actions", data=rng.uniform(-1, 1, (n, 7)))
            if rewards:
                r = np.zeros(n)
                r[-1] = float(i != 2)   # demo_2 never reaches success
                demo.create_dataset("rewards", data=r)
            dones = np.zeros(n, np.int64)
            dones[-1] = 1
            demo.create_dataset("dones", data=dones)
            first += n
        for key, demos in masks.items():
            f.create_dataset(f"mask/{key}", data=np.array(demos, dtype="S"))
    return path


LEROBOT_CAMERAS = {"observation.images.cam_left_wrist": "left", "observation.images.cam_right_wrist": "right",
                   "observation.images.cam_high": "global"}


LEROBOT_VIDEO_OPTIONS = {"g": "2", "crf": "30", "preset": "12"}   # LeRobot's defaults for its AV1 encoder


def write_lerobot(root, lengths=(6, 9, 7), files=((0, 1), (2,)), size=(48, 64), fps=10, version="v3.0",
                  rewards=True, image_cameras=()):
    """A LeRobot v3.0 dataset as LeRobot writes it: episodes packed into shared parquet and mp4
    files (``files`` groups the episode indices per file), located through meta/episodes;
    videos in AV1 (libsvtav1, yuv420p). Cameras in ``image_cameras`` are 'image' features
    instead: PNG bytes in the data files' rows."""
    import av
    import pyarrow as pa
    import pyarrow.parquet as pq

    features = {key: {"dtype": "video", "shape": [*size, 3], "names": ["height", "width", "channels"],
                      "info": {"video.fps": fps, "video.codec": "av1", "video.pix_fmt": "yuv420p"}}
                for key in LEROBOT_CAMERAS}
    for key in image_cameras:
        features[key] = {"dtype": "image", "shape": [*size, 3], "names": ["height", "width", "channels"]}
    features.update({
        "observation.state": {"dtype": "float32", "shape": [14], "names": None},
        "action": {"dtype": "float32", "shape": [14], "names": None},
        "timestamp": {"dtype": "float32", "shape": [1], "names": None},
        "frame_index": {"dtype": "int64", "shape": [1], "names": None},
        "episode_index": {"dtype": "int64", "shape": [1], "names": None},
        "index": {"dtype": "int64", "shape": [1], "names": None},
        "task_index": {"dtype": "int64", "shape": [1], "names": None}})
    if rewards:
        features["next.reward"] = {"dtype": "float32", "shape": [1], "names": None}
    info = {"codebase_version": version, "robot_type": "aloha", "total_episodes": len(lengths),
            "total_frames": sum(lengths), "total_tasks": 1, "chunks_size": 1000, "data_files_size_in_mb": 100,
            "video_files_size_in_mb": 500, "fps": fps, "splits": {"train": f"0:{len(lengths)}"},
            "data_path": "data/chunk-{chunk_index:03d}/file-{file_index:03d}.parquet",
            "video_path": "videos/{video_key}/chunk-{chunk_index:03d}/file-{file_index:03d}.mp4",
            "features": features}
    os.makedirs(os.path.join(root, "meta", "episodes", "chunk-000"), exist_ok=True)
    with open(os.path.join(root, "meta", "info.json"), "w") as f:
        json.dump(info, f, indent=4)
    rng = np.random.default_rng(0)
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    episode_rows = []
    for file_index, episodes in enumerate(files):
        columns = {k: [] for k in ("observation.state", "action", "timestamp", "frame_index", "episode_index",
                                   "index", "task_index", "next.reward", *image_cameras)}
        seconds = 0.0
        for cam, view in LEROBOT_CAMERAS.items():
            if cam in image_cameras:
                for e in episodes:
                    for frame in camera_frames(view, int(starts[e]), lengths[e], size):
                        png = io.BytesIO()
                        Image.fromarray(frame).save(png, "PNG")
                        columns[cam].append({"bytes": png.getvalue(), "path": None})
                continue
            path = os.path.join(root, info["video_path"].format(video_key=cam, chunk_index=0, file_index=file_index))
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with av.open(path, "w") as container:
                stream = container.add_stream("libsvtav1", rate=fps)
                stream.height, stream.width, stream.pix_fmt = size[0], size[1], "yuv420p"
                stream.options = LEROBOT_VIDEO_OPTIONS
                for e in episodes:
                    for frame in camera_frames(view, int(starts[e]), lengths[e], size):
                        container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
                container.mux(stream.encode())
        for e in episodes:
            n = lengths[e]
            state = rng.normal(size=(n, 14)).astype(np.float32)
            columns["observation.state"] += state.tolist()
            columns["action"] += (state + 0.1).tolist()
            columns["timestamp"] += (np.arange(n) / fps).tolist()
            columns["frame_index"] += list(range(n))
            columns["episode_index"] += [e] * n
            columns["index"] += list(range(int(starts[e]), int(starts[e]) + n))
            columns["task_index"] += [0] * n
            reward = np.zeros(n)
            reward[-1] = float(e != 1)   # episode 1 fails
            columns["next.reward"] += reward.tolist()
            row = {"episode_index": e, "tasks": ["transfer the cube"], "length": n, "data/chunk_index": 0,
                   "data/file_index": file_index, "dataset_from_index": int(starts[e]),
                   "dataset_to_index": int(starts[e]) + n}
            for cam in set(LEROBOT_CAMERAS) - set(image_cameras):
                row.update({f"videos/{cam}/chunk_index": 0, f"videos/{cam}/file_index": file_index,
                            f"videos/{cam}/from_timestamp": seconds, f"videos/{cam}/to_timestamp": seconds + n / fps})
            seconds += n / fps
            episode_rows.append(row)
        if not rewards:
            del columns["next.reward"]
        types = {"observation.state": pa.list_(pa.float32()), "action": pa.list_(pa.float32()),
                 "timestamp": pa.float32(), "next.reward": pa.float32(),
                 **{cam: pa.struct([("bytes", pa.binary()), ("path", pa.string())]) for cam in image_cameras}}
        table = pa.table({k: pa.array(v, types.get(k, pa.int64())) for k, v in columns.items()})
        data_path = os.path.join(root, info["data_path"].format(chunk_index=0, file_index=file_index))
        os.makedirs(os.path.dirname(data_path), exist_ok=True)
        pq.write_table(table, data_path)
    pq.write_table(pa.Table.from_pylist(episode_rows), os.path.join(root, "meta", "episodes", "chunk-000",
                                                                     "file-000.parquet"))
    pq.write_table(pa.table({"task_index": [0], "task": ["transfer the cube"]}), os.path.join(root, "meta",
                                                                                            "tasks.parquet"))
    return root
