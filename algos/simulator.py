"""Built-in dual-arm simulator, scripted operators and policy rollouts.

A real robot cannot be rolled out from a training script, so this module gives the
project a small, fast, numpy-only stand-in that renders the same three camera views
and the same 16-d joint vector as the reference robot. It makes AverageReturn honest.

Plug-in point (the simulator interface)
---------------------------------------
Any simulator that follows this gymnasium-style interface can be used for evaluation:

    env = factory(**config)                # config: the JSON dict stored in the HDF5 file
    obs = env.reset(seed=int)              # dict: left_image, right_image, global_image
                                           #       (H x W x 3 uint8) and joint (float32)
    obs, reward, terminated, truncated, info = env.step(action)   # raw joint-width action

Register a factory under a name with ``register_simulator(name, factory)``, or write an
import path ``"package.module:ClassName"`` into the dataset's ``simulator`` attribute;
``make_simulator`` resolves both. A simulator may also provide
``reference_policy(name, seed) -> callable(env) -> action`` for the behaviours named in
``REFERENCE_BEHAVIOURS`` (expert = 1, noisy = 0); with them, evaluation also reports a
normalised score.

The built-in task ("dual_arm_reach")
------------------------------------
A table seen from above holds a red box (the goal) and a blue box (a distractor), both
placed at random each episode. Two planar 7-joint arms with grippers stand at the near
edge. Success: the left gripper closed on the red box's left handle and the right
gripper on its right handle. The box positions appear only in the images, never in the
joint vector, so a policy that ignores the cameras cannot solve it. Actions are joint
targets; each joint moves toward its target at a bounded speed.

The second task ("dual_arm_carry")
----------------------------------
Same table, arms, views and interface. A teal zone is drawn on the table as well. Both
grippers must close on the red box's handles (one arm alone cannot move it), carry the
box into the zone and let go. The zone and the boxes are seen only in the images.

Scripted operators (``reference_policy(behaviour, seed)``, the same names in both tasks)
---------------------------------------------------------------------------------------
expert (the skill, done right), wrong (the same skill aimed at the blue box), noisy (play
that covers the table), short (misjudges depth: stops short of the goal) and hesitant
(right goal, unsure hand: slow, pauses, backs off, may run out of time).

Benchmark variants (``VARIANTS``)
---------------------------------
Named recordings that differ in what matters in real mixed-quality data: the expert's
share, the kinds of poor operator, dense or sparse reward, short or long episodes, and
the task. ``dev`` variants are for choosing defaults, ``test`` variants only for
reporting. ``create_variant_dataset`` records one; ``create_dataset.py --create_sample
--variant NAME`` does the same from the command line, ``--list_variants`` lists them.
"""
import importlib
import json
import os
import time

import numpy as np

from algos.hdf5_format import IMAGE_KEYS, DatasetWriter

SIMULATOR_ATTR = "simulator"            # HDF5 attribute naming the simulator
SIMULATOR_CONFIG_ATTR = "simulator_config"
REFERENCE_BEHAVIOURS = ("expert", "noisy")   # normalised score: noisy = 0, expert = 1

# --- geometry of the built-in task (world units; the table spans [-1, 1] x [-1, 1]) ---
LINK_LENGTHS = np.array([0.36, 0.32, 0.27, 0.22, 0.18, 0.15, 0.10])
ARM_BASES = np.array([[-0.35, -0.9], [0.35, -0.9]])
# Folded rest pose of the left arm; the right arm mirrors it (q -> -q across x = 0).
LEFT_REST_POSE = np.array([-0.20, 0.17, 0.40, 0.62, 0.71, 0.59, 0.37])
REST_POSES = np.stack([LEFT_REST_POSE, -LEFT_REST_POSE])
JOINT_LIMIT = 2.6          # rad
JOINT_SPEED = 0.15         # rad per step: how far a joint moves toward its target
GRIPPER_SPEED = 0.25       # per step, gripper opening in [0 (open), 1 (closed)]
BOX_HALF_SIZE = 0.1        # the handles are the box's left and right edges
SUCCESS_RADIUS = 0.1
GRIPPER_CLOSED = 0.75      # above: closed (holds a handle it is on)
GRIPPER_OPEN = 0.5         # below: open (has let go)
ZONE_HALF_SIZE = 0.15      # dual_arm_carry: the drop zone drawn on the table
PLACE_RADIUS = 0.06        # dual_arm_carry: the box's centre this close to the zone's, and let go
WRIST_VIEW_HALF_EXTENT = 0.35
JOINTS_PER_ARM = len(LINK_LENGTHS)
JOINT_DIM = 2 * (JOINTS_PER_ARM + 1)   # 16: left 7 joints, left gripper, right 7, right gripper

COLORS = {
    "table": (118, 108, 96), "goal": (205, 40, 40), "distractor": (40, 70, 210),
    "left_arm": (70, 200, 90), "right_arm": (225, 205, 60),
    "gripper_open": (245, 245, 245), "gripper_closed": (20, 20, 20), "zone": (40, 175, 180),
}


def forward_kinematics(base, q):
    """Positions of the 8 joints of a planar chain (base first, end effector last)."""
    phi = np.pi / 2 + np.cumsum(q)
    links = LINK_LENGTHS[:, None] * np.stack([np.cos(phi), np.sin(phi)], 1)
    return base + np.concatenate([np.zeros((1, 2)), np.cumsum(links, 0)])


def jacobian(q):
    """2 x 7 Jacobian of the end-effector position with respect to the joint angles."""
    phi = np.pi / 2 + np.cumsum(q)
    d = LINK_LENGTHS[:, None] * np.stack([-np.sin(phi), np.cos(phi)], 1)
    return np.cumsum(d[::-1], 0)[::-1].T


class DualArmReach:
    """The built-in dual-arm task (see the module docstring). numpy only, ~0.1 ms a step.

    ``joint_speed`` (rad per step) below the default makes every motion slower, so the
    same task takes more steps: a long-horizon variant of it.
    """

    name = "dual_arm_reach"
    default_max_steps = 50

    def __init__(self, image_size=(84, 84), max_steps=None, reward="dense", min_box_separation=0.45,
                 joint_speed=JOINT_SPEED):
        if isinstance(image_size, int):
            image_size = (image_size, image_size)
        self.image_size = (int(image_size[0]), int(image_size[1]))
        self.max_steps = int(self.default_max_steps if max_steps is None else max_steps)
        if reward not in ("dense", "sparse"):
            raise ValueError(f"reward must be 'dense' or 'sparse', got {reward!r}")
        self.reward_type = reward
        self.min_box_separation = float(min_box_separation)
        self.joint_speed = float(joint_speed)
        if not 0 < self.joint_speed <= 1:
            raise ValueError(f"joint_speed must be in (0, 1] rad per step, got {joint_speed}")
        self.action_dim = JOINT_DIM
        self.joint_dim = JOINT_DIM
        self._grid_cache = {}
        self.rng = np.random.default_rng(0)
        self.reset(seed=0)

    def config(self):
        """JSON-able settings that rebuild this simulator (stored in the HDF5 attributes)."""
        return {"image_size": list(self.image_size), "max_steps": self.max_steps,
                "reward": self.reward_type, "min_box_separation": self.min_box_separation,
                "joint_speed": self.joint_speed}

    # ---------------------------------------------------------------- state
    def reset(self, seed=None):
        if seed is not None:
            self.rng = np.random.default_rng(seed)
        rng = self.rng
        self._sample_scene(rng)
        self.q = REST_POSES + rng.uniform(-0.15, 0.15, size=REST_POSES.shape)
        self.gripper = np.zeros(2)
        self.t = 0
        self._update_kinematics()
        return self.observation()

    def _sample_scene(self, rng):
        """The red goal box and the blue distractor, apart from each other."""
        self.goal = self._sample_box(rng)
        while True:
            self.distractor = self._sample_box(rng)
            if np.linalg.norm(self.distractor - self.goal) >= self.min_box_separation:
                break

    @staticmethod
    def _sample_box(rng):
        return np.array([rng.uniform(-0.45, 0.45), rng.uniform(-0.1, 0.4)])

    def _update_kinematics(self):
        self.arm_points = [forward_kinematics(ARM_BASES[k], self.q[k]) for k in range(2)]
        self.end_effectors = np.stack([p[-1] for p in self.arm_points])

    def handles(self, box):
        """Where the left and right grippers must close on a box."""
        return box + np.array([[-BOX_HALF_SIZE, 0.0], [BOX_HALF_SIZE, 0.0]])

    def handle_distances(self, box=None):
        box = self.goal if box is None else box
        return np.linalg.norm(self.end_effectors - self.handles(box), axis=1)

    def joint_vector(self):
        return np.concatenate([self.q[0], self.gripper[:1], self.q[1], self.gripper[1:]]).astype(np.float32)

    def is_success(self):
        return bool(np.all(self.handle_distances() < SUCCESS_RADIUS) and np.all(self.gripper > GRIPPER_CLOSED))

    def distance(self):
        """How far the task is from done (the dense reward's potential): mean gripper-to-handle distance."""
        return self.handle_distances().mean()

    def step(self, action):
        action = np.asarray(action, dtype=np.float64).reshape(-1)
        if action.shape[0] != JOINT_DIM:
            raise ValueError(f"action must have {JOINT_DIM} values, got {action.shape[0]}")
        if not np.all(np.isfinite(action)):
            raise ValueError("action contains NaN or Inf")
        before = self.distance()
        self._move(action)
        self.t += 1
        after = self.distance()
        success = self.is_success()
        reward = float(success)
        if self.reward_type == "dense":
            reward += before - after   # potential-based shaping: progress toward done
        truncated = (not success) and self.t >= self.max_steps
        return self.observation(), reward, success, truncated, {"success": success, "distance": after}

    def _move(self, action):
        """Each joint and gripper one bounded step toward its target."""
        target = np.stack([action[0:7], action[8:15]])
        target_gripper = action[[7, 15]]
        speed = self.joint_speed
        self.q = np.clip(self.q + np.clip(target - self.q, -speed, speed), -JOINT_LIMIT, JOINT_LIMIT)
        self.gripper = np.clip(self.gripper + np.clip(target_gripper - self.gripper, -GRIPPER_SPEED, GRIPPER_SPEED), 0, 1)
        self._update_kinematics()

    # ---------------------------------------------------------------- rendering
    def observation(self):
        h, w = self.image_size
        return {
            "left_image": self.render_view(self.end_effectors[0], WRIST_VIEW_HALF_EXTENT, h, w),
            "right_image": self.render_view(self.end_effectors[1], WRIST_VIEW_HALF_EXTENT, h, w),
            "global_image": self.render_view(np.zeros(2), 1.0, h, w),
            "joint": self.joint_vector(),
        }

    def render_view(self, center, half_extent, h, w):
        """Top-down view of the square [center +- half_extent] as an h x w x 3 uint8 image."""
        px_per_unit = np.array([w, h]) / (2.0 * half_extent)
        origin = np.asarray(center) - half_extent          # world coords of the image's left/bottom edge
        img = np.empty((h, w, 3), np.float32)
        img[:] = COLORS["table"]
        # Boxes (and zones) with anti-aliased edges (area coverage per pixel), so sub-pixel
        # positions remain visible at 32 x 32.
        for center, half_size, color in self.scene_squares():
            lo = (center - half_size - origin) * px_per_unit
            hi = (center + half_size - origin) * px_per_unit
            cov_x = np.clip(np.minimum(np.arange(1, w + 1), hi[0]) - np.maximum(np.arange(w), lo[0]), 0, 1)
            cov_y = np.clip(np.minimum(np.arange(1, h + 1), hi[1]) - np.maximum(np.arange(h), lo[1]), 0, 1)[::-1]
            if cov_x.any() and cov_y.any():
                cover = (cov_y[:, None] * cov_x[None, :])[..., None]
                img += cover * (np.asarray(color, np.float32) - img)
        for k, arm in enumerate(("left_arm", "right_arm")):
            self._splat_polyline(img, self.arm_points[k], 0.02, COLORS[arm], origin, px_per_unit)
            grip = COLORS["gripper_closed"] if self.gripper[k] > 0.5 else COLORS["gripper_open"]
            self._splat_polyline(img, self.arm_points[k][-1:], 0.035, grip, origin, px_per_unit)
        return img.astype(np.uint8)

    def scene_squares(self):
        """What lies on the table, bottom first: (centre, half size, colour) of each square."""
        return [(self.distractor, BOX_HALF_SIZE, COLORS["distractor"]), (self.goal, BOX_HALF_SIZE, COLORS["goal"])]

    def _splat_polyline(self, img, points, radius, color, origin, px_per_unit):
        h, w = img.shape[:2]
        pix = (points - origin) * px_per_unit
        if len(pix) > 1:   # sample along each link at half-pixel spacing
            seg = np.diff(pix, axis=0)
            n = max(2, int(np.ceil(np.abs(seg).max() * 2)) + 1)
            t = np.linspace(0, 1, n)[None, :, None]
            pix = (pix[:-1, None, :] + t * seg[:, None, :]).reshape(-1, 2)
        r = max(0.5, radius * px_per_unit.mean())
        offsets = self._disk_offsets(r)
        cols = np.floor(pix[:, 0])[:, None].astype(np.int64) + offsets[None, :, 0]
        rows = (h - 1 - np.floor(pix[:, 1]))[:, None].astype(np.int64) + offsets[None, :, 1]
        keep = (cols >= 0) & (cols < w) & (rows >= 0) & (rows < h)
        img[rows[keep], cols[keep]] = color

    def _disk_offsets(self, r):
        key = round(r, 2)
        if key not in self._grid_cache:
            k = int(np.ceil(r))
            dx, dy = np.meshgrid(np.arange(-k, k + 1), np.arange(-k, k + 1))
            inside = dx ** 2 + dy ** 2 <= max(r - 0.5, 0) ** 2 + 1e-9
            self._grid_cache[key] = np.stack([dx[inside], dy[inside]], 1)
        return self._grid_cache[key]

    # ---------------------------------------------------------------- operators
    def reference_policy(self, behaviour, seed):
        """A scripted operator of this task (``OPERATORS[self.name]``): 'expert', 'wrong'
        (confidently reaches the blue box), 'noisy', 'short' or 'hesitant'."""
        operators = OPERATORS[self.name]
        if behaviour not in operators:
            raise ValueError(f"unknown operator {behaviour!r} for {self.name}; known: {list(operators)}")
        return operators[behaviour](np.random.default_rng(seed))


class DualArmCarry(DualArmReach):
    """Both grippers grasp the red box by its handles, carry it into the teal zone and let go.

    Not a reach: the box moves only while both grippers are closed on its handles (it
    moves with the mean of the two grippers' motion), so the arms must grasp together,
    move together, and release at the right place. Success: the box's centre within
    PLACE_RADIUS of the zone's and both grippers open. The dense reward is the progress
    of (mean gripper-to-handle distance + box-to-zone distance), plus 1 on success. The
    blue box can be carried as well, which is what the wrong operator does. The zone and
    the boxes appear only in the images.
    """

    name = "dual_arm_carry"
    default_max_steps = 80

    def __init__(self, image_size=(84, 84), max_steps=None, reward="dense", min_box_separation=0.45,
                 joint_speed=JOINT_SPEED, min_zone_distance=0.35):
        self.min_zone_distance = float(min_zone_distance)
        super().__init__(image_size, max_steps, reward, min_box_separation, joint_speed)

    def config(self):
        return dict(super().config(), min_zone_distance=self.min_zone_distance)

    def _sample_scene(self, rng):
        """The boxes as in the reach task, and a zone away from both (the red box starts outside it)."""
        super()._sample_scene(rng)
        while True:
            self.zone = self._sample_box(rng)
            if (np.linalg.norm(self.zone - self.goal) >= self.min_zone_distance
                    and np.linalg.norm(self.zone - self.distractor) >= self.min_zone_distance):
                break

    def held_box(self):
        """'goal' or 'distractor': the box both closed grippers hold by its handles, or None."""
        if not np.all(self.gripper > GRIPPER_CLOSED):
            return None
        held, nearest = None, SUCCESS_RADIUS
        for name in ("goal", "distractor"):
            worst_hand = self.handle_distances(getattr(self, name)).max()
            if worst_hand < nearest:
                held, nearest = name, worst_hand
        return held

    def box_to_zone(self):
        return float(np.linalg.norm(self.goal - self.zone))

    def is_success(self):
        return bool(self.box_to_zone() < PLACE_RADIUS and np.all(self.gripper < GRIPPER_OPEN))

    def distance(self):
        """Mean gripper-to-handle distance plus box-to-zone distance: 0 when placed and let go of."""
        return self.handle_distances().mean() + self.box_to_zone()

    def _move(self, action):
        held = self.held_box()
        before = self.end_effectors.copy()
        super()._move(action)
        if held is not None and np.all(self.gripper > GRIPPER_CLOSED):   # still gripping: the box follows
            box = getattr(self, held)
            box += (self.end_effectors - before).mean(0)
            np.clip(box, -1.0, 1.0, out=box)

    def scene_squares(self):
        return [(self.zone, ZONE_HALF_SIZE, COLORS["zone"])] + super().scene_squares()


class ReachOperator:
    """Moves both grippers to a box's handles and closes them (damped least-squares IK).

    ``target='goal'`` is the expert; ``target='distractor'`` is the confident but wrong
    operator: the same skill and style aimed at the wrong box, a distinct mode of the
    data that plain behaviour cloning averages with the expert's.
    """

    def __init__(self, rng, target="goal", speed=0.07, joint_noise=0.004):
        self.rng, self.target, self.speed, self.joint_noise = rng, target, speed, joint_noise

    def __call__(self, env):
        return self.move_to(env, self.target_points(env), close_grippers=True)

    def target_points(self, env):
        """Where each gripper is heading now (2 x 2)."""
        return env.handles(getattr(env, self.target))

    def move_to(self, env, points, close_grippers=False):
        """Joint targets that move each gripper toward its point; close it when there.

        The gripper's step scales with the simulator's joint speed: on slower arms the
        operator is as slow, relative to what the arms can do, as on the default ones.
        """
        speed = self.speed * (env.joint_speed / JOINT_SPEED)
        action = np.zeros(JOINT_DIM)
        for k in range(2):
            error = points[k] - env.end_effectors[k]
            dist = np.linalg.norm(error)
            if dist > speed:
                error *= speed / dist
            jac = jacobian(env.q[k])
            pinv = jac.T @ np.linalg.inv(jac @ jac.T + 0.02 * np.eye(2))
            null_space = (np.eye(JOINTS_PER_ARM) - pinv @ jac) @ (0.1 * (REST_POSES[k] - env.q[k]))
            dq = np.clip(pinv @ error + null_space, -env.joint_speed, env.joint_speed)
            dq += self.rng.normal(0, self.joint_noise, JOINTS_PER_ARM)
            action[8 * k: 8 * k + 7] = env.q[k] + dq
            action[8 * k + 7] = 1.0 if close_grippers and dist < 1.5 * SUCCESS_RADIUS else 0.0
        return action


class NoisyPlayOperator:
    """Play: each arm reaches for random points of the table with the expert's skill,
    switching to a new point every few steps, grippers opening and closing at random.
    It covers the workspace at a human operator's speed but solves nothing on purpose."""

    def __init__(self, rng, switch_every=(6, 15)):
        self.rng, self.switch_every = rng, switch_every
        self.reach = ReachOperator(rng)
        self.points, self.steps_left = None, 0
        self.grip = np.zeros(2)

    def __call__(self, env):
        if self.steps_left <= 0:
            self.points = np.stack([self.rng.uniform([-0.9, -0.5], [0.9, 0.6]) for _ in range(2)])
            self.steps_left = int(self.rng.integers(*self.switch_every))
        self.steps_left -= 1
        action = self.reach.move_to(env, self.points)
        flip = self.rng.random(2) < 0.05
        self.grip[flip] = 1.0 - self.grip[flip]
        action[[7, 15]] = self.grip
        return action


def hold_still(env, grippers=None):
    """The action that keeps every joint where it is (grippers: where they are, or as given)."""
    action = np.concatenate([env.q[0], env.gripper[:1], env.q[1], env.gripper[1:]])
    if grippers is not None:
        action[[7, 15]] = grippers
    return action


class StopShortOperator(ReachOperator):
    """Reaches for the right box and closes the grippers on air, a few centimetres short.

    Top-down cameras make depth hard to judge, and a careful operator who fears a
    collision stops early: the motion is the expert's, the goal is right, the dense
    reward credits most of the approach, yet the task is never done. The stopping gap
    (0.2 - 0.3, twice the success radius and more) is drawn once an episode along the
    direction the grippers came from.
    """

    def __init__(self, rng, gap=(0.2, 0.3), **kwargs):
        super().__init__(rng, "goal", **kwargs)
        self.gap = rng.uniform(*gap)
        self.approach = None

    def target_points(self, env):
        handles = env.handles(env.goal)
        if self.approach is None:   # unit vectors from each handle back toward its gripper's start
            away = env.end_effectors - handles
            self.approach = away / np.maximum(np.linalg.norm(away, axis=1, keepdims=True), 1e-9)
        return handles + self.gap * self.approach


class HesitantOperator:
    """The right goal with an unsure hand: slow, pausing, now and then backing off.

    Novices and tired operators move at a fraction of the expert's speed, stop to look,
    and retreat before trying again. Their data heads the right way but wastes time, and
    under a time limit some of it never finishes: the same intention as the expert with
    worse timing, which a learner should not copy. Wraps a slower copy of the expert's
    skill (``base``, which gives ``target_points`` and ``move_to``); each step it keeps
    going, or starts a pause (holds every joint, 3-8 steps) or a back-off (moves the
    grippers away from where they were heading, 2-5 steps, grippers as they are).
    """

    def __init__(self, rng, base, pause_chance=0.07, back_off_chance=0.04):
        self.rng, self.base = rng, base
        self.pause_chance, self.back_off_chance = pause_chance, back_off_chance
        self.mode, self.steps_left = "go", 0

    def __call__(self, env):
        if self.steps_left <= 0:
            u = self.rng.random()
            if u < self.pause_chance:
                self.mode, self.steps_left = "pause", int(self.rng.integers(3, 9))
            elif u < self.pause_chance + self.back_off_chance:
                self.mode, self.steps_left = "back", int(self.rng.integers(2, 6))
            else:
                self.mode, self.steps_left = "go", 1
        self.steps_left -= 1
        if self.mode == "pause":
            return hold_still(env)
        if self.mode == "back":
            away = 2 * env.end_effectors - self.base.target_points(env)
            action = self.base.move_to(env, away)
            action[[7, 15]] = env.gripper
            return action
        return self.base(env)


class CarryOperator(ReachOperator):
    """dual_arm_carry: grasps a box by both handles, carries it to the zone, lets go there.

    ``box='goal'`` with a small ``release_distance`` is the expert. ``box='distractor'``
    is the confident wrong operator: the whole skill, done well, on the blue box. A large
    ``release_distance`` makes the operator who sets the box down short of the zone.
    While carrying, both grippers aim at their own position plus the box's offset to the
    zone, so they move in parallel and the box keeps its grip. It decides from the state
    alone (no memory), so it can also be asked what it would do in a state it did not
    make (benchmarks/closed_loop.py does).
    """

    def __init__(self, rng, box="goal", release_distance=0.02, **kwargs):
        super().__init__(rng, box, **kwargs)
        self.release_distance = release_distance

    def target_points(self, env):
        box = getattr(env, self.target)
        if env.held_box() == self.target:
            return env.end_effectors + (env.zone - box)
        return env.handles(box)

    def __call__(self, env):
        if np.linalg.norm(env.zone - getattr(env, self.target)) < self.release_distance:
            return hold_still(env, grippers=0.0)     # there (to its mind): let go and stay
        if env.held_box() == self.target:
            action = self.move_to(env, self.target_points(env))
            action[[7, 15]] = 1.0
            return action
        return self.move_to(env, self.target_points(env), close_grippers=True)


REACH_OPERATORS = {
    "expert": lambda rng: ReachOperator(rng, "goal"),
    "wrong": lambda rng: ReachOperator(rng, "distractor"),
    "noisy": lambda rng: NoisyPlayOperator(rng),
    "short": lambda rng: StopShortOperator(rng),
    "hesitant": lambda rng: HesitantOperator(rng, ReachOperator(rng, "goal", speed=0.035)),
}
CARRY_OPERATORS = {
    "expert": lambda rng: CarryOperator(rng, "goal"),
    "wrong": lambda rng: CarryOperator(rng, "distractor"),
    "noisy": lambda rng: NoisyPlayOperator(rng),
    "short": lambda rng: CarryOperator(rng, "goal", release_distance=rng.uniform(0.15, 0.3)),
    "hesitant": lambda rng: HesitantOperator(rng, CarryOperator(rng, "goal", speed=0.035)),
}
OPERATORS = {DualArmReach.name: REACH_OPERATORS, DualArmCarry.name: CARRY_OPERATORS}
SCRIPTED_OPERATORS = REACH_OPERATORS      # the reach task's, under its earlier name
BEHAVIOURS = tuple(SCRIPTED_OPERATORS)    # every operator name, in the order files list them
OPERATOR_DESCRIPTIONS = {
    "expert": "does the task",
    "wrong": "confident, wrong goal: the blue box",
    "noisy": "random play over the table",
    "short": "right goal, stops short of it",
    "hesitant": "right goal, slow, pauses and backs off",
}

# ------------------------------------------------------------------ plug-in registry
SIMULATORS = {DualArmReach.name: DualArmReach, DualArmCarry.name: DualArmCarry}


def register_simulator(name, factory):
    """Make ``make_simulator(name, ...)`` build ``factory(**config)``."""
    SIMULATORS[name] = factory


def make_simulator(name, config=None):
    """Build a simulator from a registered name or a 'package.module:ClassName' path."""
    config = dict(config or {})
    if name in SIMULATORS:
        return SIMULATORS[name](**config)
    if ":" in name:
        module_name, _, attr = name.partition(":")
        try:
            factory = getattr(importlib.import_module(module_name), attr)
        except (ImportError, AttributeError) as exc:
            raise ValueError(f"cannot import simulator {name!r}: {exc}") from None
        return factory(**config)
    raise ValueError(f"unknown simulator {name!r}; known: {sorted(SIMULATORS)} "
                     "(or give 'package.module:ClassName')")


def simulator_from_attrs(attrs):
    """(name, config) from an HDF5 file's attributes, or None when no simulator is named."""
    name = attrs.get(SIMULATOR_ATTR)
    if name is None:
        return None
    if isinstance(name, bytes):
        name = name.decode()
    config = attrs.get(SIMULATOR_CONFIG_ATTR, "{}")
    if isinstance(config, bytes):
        config = config.decode()
    return str(name), json.loads(config)


# ------------------------------------------------------------------ rollouts
def rollout(envs, act, seeds, step=None):
    """Roll out ``act`` in lockstep on one env per seed; returns (returns, successes, lengths).

    ``act(obs_list) -> array [len(obs_list), action_dim]`` sees only the envs still
    running, so a learned policy is evaluated as one batch per step. ``step(i, obs, action)``,
    if given, replaces ``envs[i].step(action)`` (same return), for a caller that looks at
    each state around its step (benchmarks/closed_loop.py asks an expert there).
    """
    step = step or (lambda i, obs, action: envs[i].step(action))
    obs = [env.reset(seed=int(s)) for env, s in zip(envs, seeds)]
    returns = np.zeros(len(envs))
    successes = np.zeros(len(envs), bool)
    lengths = np.zeros(len(envs), int)
    running = list(range(len(envs)))
    while running:
        actions = act([obs[i] for i in running])
        still = []
        for i, action in zip(running, actions):
            obs[i], reward, terminated, truncated, info = step(i, obs[i], action)
            returns[i] += reward
            lengths[i] += 1
            successes[i] |= bool(info.get("success", terminated))
            if not (terminated or truncated):
                still.append(i)
        running = still
    return returns, successes, lengths


def reference_returns(name, config, seeds, behaviours=REFERENCE_BEHAVIOURS):
    """Mean return of each scripted behaviour on the given seeds, or {} if the simulator has none."""
    env = make_simulator(name, config)
    if not hasattr(env, "reference_policy"):
        return {}
    out = {}
    for behaviour in behaviours:
        returns = []
        for s in seeds:
            env.reset(seed=int(s))
            operator = env.reference_policy(behaviour, 1_000_003 + int(s))
            total, done = 0.0, False
            while not done:
                _, reward, terminated, truncated, _ = env.step(operator(env))
                total += reward
                done = terminated or truncated
            returns.append(total)
        out[behaviour] = float(np.mean(returns))
    return out


def normalized_score(average_return, references):
    """(R - R_noisy) / (R_expert - R_noisy), or None when the references are missing."""
    if not references or "expert" not in references or "noisy" not in references:
        return None
    span = references["expert"] - references["noisy"]
    if abs(span) < 1e-9:
        return None
    return (average_return - references["noisy"]) / span


EVAL_SEED_BASE = 1_000_000     # rollout seeds; sample datasets are recorded from other seeds


class RolloutEvaluator:
    """Rolls the policy out in the dataset's simulator on fixed seeds (one batched call per step)."""

    def __init__(self, name, config, episodes):
        self.name, self.config = name, config
        self.seeds = [EVAL_SEED_BASE + i for i in range(episodes)]
        self.envs = [make_simulator(name, config) for _ in self.seeds]
        self.references = reference_returns(name, config, self.seeds)

    def __call__(self, agent, step=None):
        """Scores of ``agent``'s rollouts; ``step`` as in ``rollout`` (eval_policy.py films there)."""
        returns, successes, _ = rollout(self.envs, agent.act_on_observations, self.seeds, step)
        avg = float(returns.mean())
        return {"AverageReturn": avg, "StdReturn": float(returns.std()), "SuccessRate": float(successes.mean()),
                "NormalizedScore": normalized_score(avg, self.references)}


# ------------------------------------------------------------------ sample datasets
DEFAULT_MIX = {"expert": 1 / 3, "wrong": 1 / 3, "noisy": 1 / 3}


def parse_mix(text, behaviours=BEHAVIOURS):
    """'expert=0.4,wrong=0.3,noisy=0.3' -> {behaviour: fraction of episodes} (sums to 1)."""
    mix = {}
    for part in str(text).split(","):
        name, sep, value = part.partition("=")
        name = name.strip()
        if not sep or name not in behaviours:
            raise ValueError(f"bad --mix entry {part!r}: use name=fraction with names from {list(behaviours)}")
        try:
            mix[name] = float(value)
        except ValueError:
            raise ValueError(f"bad --mix fraction {value!r} for {name}") from None
        if mix[name] < 0:
            raise ValueError(f"--mix fraction for {name} is negative")
    total = sum(mix.values())
    if total <= 0:
        raise ValueError("--mix fractions sum to zero")
    return {k: v / total for k, v in mix.items()}


def create_sample_dataset(path, n_samples=5000, image_size=(84, 84), mix=None, seed=0, max_steps=None,
                          reward="dense", progress=True, task=DualArmReach.name):
    """Record ``n_samples`` transitions of mixed-quality episodes from a built-in simulator.

    Episodes are assigned to behaviours in the proportions of ``mix`` (by episode, as
    operators record whole demonstrations). The file stores which simulator, settings
    and mix produced it, and the behaviour of every row (key ``behaviour``).
    ``max_steps=None`` is the task's own time limit (50 steps for dual_arm_reach).
    """
    env = make_simulator(task, {"image_size": image_size, "max_steps": max_steps, "reward": reward})
    return record_dataset(path, n_samples, env, dict(mix or DEFAULT_MIX), seed, progress=progress)


def record_dataset(path, n_samples, env, mix, seed=0, attrs=None, progress=True):
    """Record ``n_samples`` rows of ``env``'s scripted operators in the proportions of ``mix``.

    The attributes name the simulator and its config, the mix, the operators of the file
    (``behaviour_names``, which the per-row ``behaviour`` key indexes), the reward type,
    the seed, and whatever ``attrs`` adds. Returns episode counts and the seconds taken.
    """
    from tqdm import tqdm

    operators = OPERATORS.get(env.name, {})
    unknown = [k for k in mix if k not in operators]
    if unknown:
        raise ValueError(f"{env.name} has no operator {unknown}; known: {list(operators)}")
    names = [k for k in operators if mix.get(k, 0) > 0]
    all_attrs = {SIMULATOR_ATTR: env.name, SIMULATOR_CONFIG_ATTR: json.dumps(env.config()),
                 "behaviour_mix": json.dumps(mix), "behaviour_names": json.dumps(names), "seed": int(seed),
                 "reward_type": env.reward_type, "created_by": "create_dataset.py --create_sample"}
    all_attrs.update(attrs or {})
    writer = DatasetWriter(path, n_samples, env.image_size, JOINT_DIM, JOINT_DIM, all_attrs,
                           extra_int_keys=("behaviour",))
    rng = np.random.default_rng(seed)
    counts = {k: 0 for k in mix}
    written, episode = 0, 0
    started = time.perf_counter()
    bar = tqdm(total=n_samples, desc=f"Recording {os.path.basename(str(path))}", unit="step", disable=not progress)
    try:
        while written < n_samples:
            # stratified: the behaviour furthest below its share records the next episode
            behaviour = max(mix, key=lambda k: mix[k] * (episode + 1) - counts[k])
            counts[behaviour] += 1
            episode_seed = int(rng.integers(2 ** 31))
            rows = _record_episode(env, behaviour, episode_seed, n_samples - written)
            rows["behaviour"] = np.full(len(rows["rewards"]), names.index(behaviour), np.uint8)
            writer.write(rows)
            written += len(rows["rewards"])
            episode += 1
            bar.update(len(rows["rewards"]))
        bar.close()
        writer.close()
    except BaseException:
        writer.abort()
        raise
    return {"episodes": episode, "episodes_per_behaviour": counts, "simulator": env.name,
            "seconds": time.perf_counter() - started}


def _record_episode(env, behaviour, seed, max_rows):
    obs = env.reset(seed=seed)
    operator = env.reference_policy(behaviour, seed + 1)
    rows = {k: [] for k in ("left_image", "right_image", "global_image", "joint", "actions", "rewards",
                            "terminals", "timeouts")}
    done = False
    while not done and len(rows["rewards"]) < max_rows:
        action = operator(env)
        for k in IMAGE_KEYS + ("joint",):
            rows[k].append(obs[k])
        next_obs, reward, terminated, truncated, _ = env.step(action)
        rows["actions"].append(action.astype(np.float32))
        rows["rewards"].append(reward)
        rows["terminals"].append(terminated)
        done = terminated or truncated
        # an episode cut by the time limit or by the end of the file is a timeout
        rows["timeouts"].append(truncated or (not terminated and len(rows["rewards"]) == max_rows))
        obs = next_obs
    out = {k: np.asarray(v) for k, v in rows.items()}
    out["rewards"] = out["rewards"].astype(np.float32)
    return out


# ------------------------------------------------------------------ benchmark variants
# Each variant changes what matters in real mixed-quality recordings: the expert's share,
# the kinds of poor operator, dense or sparse reward, episode length, the task. Every one
# holds a clearly bad operator (wrong goal or stopping short). "dev" variants are for
# choosing defaults; "test" variants only for reporting, and each differs from every dev
# variant in at least one of those axes. Every axis a test variant varies (a tenth of
# the episodes expert, long slow episodes) is also varied by some dev variant, so a
# weakness a test variant shows can be studied without choosing on it.
VARIANTS = {
    "reach_wrong40": {
        "simulator": "dual_arm_reach", "config": {"reward": "dense", "max_steps": 50},
        "mix": {"expert": 0.4, "wrong": 0.4, "noisy": 0.2}, "split": "dev",
        "description": "as many confident wrong-box episodes as expert ones, dense reward"},
    "reach_sparse_short": {
        "simulator": "dual_arm_reach", "config": {"reward": "sparse", "max_steps": 50},
        "mix": {"expert": 0.25, "short": 0.45, "noisy": 0.3}, "split": "dev",
        "description": "sparse reward; most episodes head for the right box but stop short of it"},
    "reach_hesitant": {
        "simulator": "dual_arm_reach", "config": {"reward": "dense", "max_steps": 50},
        "mix": {"expert": 0.25, "wrong": 0.2, "hesitant": 0.35, "noisy": 0.2}, "split": "dev",
        "description": "more hesitant episodes than expert ones: the right box, slowly; a third of them in time"},
    "carry_dense": {
        "simulator": "dual_arm_carry", "config": {"reward": "dense", "max_steps": 80},
        "mix": {"expert": 0.35, "wrong": 0.3, "hesitant": 0.15, "noisy": 0.2}, "split": "dev",
        "description": "carry the red box into the zone; the wrong operator carries the blue one"},
    "reach_expert10_short": {
        "simulator": "dual_arm_reach", "config": {"reward": "dense", "max_steps": 50},
        "mix": {"expert": 0.1, "short": 0.3, "hesitant": 0.35, "noisy": 0.25}, "split": "dev",
        "description": "one episode in ten is expert; more hesitant ones than anything, some stopping short"},
    "reach_long_short": {
        "simulator": "dual_arm_reach", "config": {"reward": "sparse", "max_steps": 120, "joint_speed": 0.05},
        "mix": {"expert": 0.3, "short": 0.4, "noisy": 0.3}, "split": "dev",
        "description": "arms at a third of the speed, 120-step episodes, sparse reward; many stop short"},
    "reach_expert10": {
        "simulator": "dual_arm_reach", "config": {"reward": "dense", "max_steps": 50},
        "mix": {"expert": 0.1, "wrong": 0.3, "hesitant": 0.3, "noisy": 0.3}, "split": "test",
        "description": "one episode in ten is expert; hesitant operators often run out of time"},
    "reach_long_sparse": {
        "simulator": "dual_arm_reach", "config": {"reward": "sparse", "max_steps": 120, "joint_speed": 0.05},
        "mix": {"expert": 0.3, "wrong": 0.3, "hesitant": 0.2, "noisy": 0.2}, "split": "test",
        "description": "arms at a third of the speed, 120-step episodes, sparse reward"},
    "carry_sparse_wrong": {
        "simulator": "dual_arm_carry", "config": {"reward": "sparse", "max_steps": 80},
        "mix": {"expert": 0.25, "wrong": 0.4, "short": 0.15, "noisy": 0.2}, "split": "test",
        "description": "carry with sparse reward; mostly the blue box carried, some set down short"},
}
SPLITS = ("dev", "test")


def variant_names(split=None):
    """Names of the variants in ``split`` ('dev' or 'test'), or of all variants."""
    return [name for name, spec in VARIANTS.items() if split is None or spec["split"] == split]


def describe_mix(mix):
    return ", ".join(f"{k} {v:.2f}" for k, v in mix.items())


def variants_table():
    """The variants as the lines of a Markdown table (what ``create_dataset.py --list_variants`` prints)."""
    lines = ["| variant | split | task | reward | steps | mix (share of episodes) | description |",
             "|---|---|---|---|---|---|---|"]
    for name, spec in VARIANTS.items():
        factory = SIMULATORS[spec["simulator"]]
        steps = spec["config"].get("max_steps", factory.default_max_steps)
        reward = spec["config"].get("reward", "dense")
        lines.append(f"| {name} | {spec['split']} | {spec['simulator']} | {reward} | {steps} | "
                     f"{describe_mix(spec['mix'])} | {spec['description']} |")
    return lines


def create_variant_dataset(path, variant, n_samples, image_size, seed=0, progress=True, **overrides):
    """Record the named variant of ``VARIANTS``; keyword overrides replace its fields.

    ``simulator=NAME`` and ``mix={...}`` (or 'expert=0.5,...') replace the variant's task
    and mix; any other keyword (reward, max_steps, joint_speed, ...) replaces that key of
    its simulator config. The file's attributes name the variant (``variant``), its split
    (``variant_split``) and the overrides (``variant_overrides``), besides what every
    recording stores (simulator, simulator_config, behaviour_mix, behaviour_names, ...).
    """
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; known: {list(VARIANTS)}")
    spec = VARIANTS[variant]
    overrides = dict(overrides)
    given = dict(overrides)
    name = overrides.pop("simulator", spec["simulator"])
    mix = overrides.pop("mix", spec["mix"])
    if isinstance(mix, str):
        mix = parse_mix(mix)
    config = dict(spec["config"], **overrides)
    config["image_size"] = [image_size] * 2 if isinstance(image_size, int) else list(image_size)
    try:
        env = make_simulator(name, config)
    except TypeError as exc:
        raise ValueError(f"variant {variant!r}: bad setting for {name}: {exc}") from None
    attrs = {"variant": variant, "variant_split": spec["split"], "variant_overrides": json.dumps(given),
             "created_by": f"create_dataset.py --create_sample --variant {variant}"}
    return record_dataset(path, n_samples, env, dict(mix), seed, attrs, progress)
