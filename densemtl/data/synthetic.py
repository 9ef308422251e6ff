"""The embedded synthetic dataset: procedurally generated rooms rendered by vectorised ray casting.

Each frame is a rectangular room (floor, four walls, ceiling) furnished with boxes, vertical cylinders and
spheres grouped into furniture (tables, chairs, cabinets, sofas, lamps...), textured procedurally and lit by
a point light plus ambient light (Lambertian, no shadows). All pixels' rays are intersected with all
primitives at once in numpy, so a 96 x 128 frame takes a few milliseconds, and labels are exact:

- ``semseg``: the class of the visible primitive (:data:`CLASS_NAMES`);
- ``depth``: z-depth in metres (the distance along the optical axis; rooms give about 0.5-10 m);
- ``normals``: unit normals in the camera frame, x to the right, y up, z towards the viewer (a surface
  facing the camera is (0, 0, 1); the floor seen from a level camera is (0, 1, 0));
- ``edge``: one-pixel-thin boundaries where the class or the object instance changes, or where the depth
  jumps between primitives (occlusions); the pixel nearer to the camera is marked;
- ``saliency``: the furniture (every object class except pictures on the walls).

Frames are deterministic functions of ``(seed, split, index)``. Video clips move the camera smoothly through
one scene. Splits are rendered once and cached as compressed ``.npz`` under the cache directory, keyed by
every generation parameter and :data:`GENERATOR_VERSION`.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
from torch.utils.data import Dataset
from tqdm import tqdm

from densemtl.config import DataConfig, SyntheticConfig
from densemtl.data.transforms import build_transform
from densemtl.dataset_info import DatasetInfo
from densemtl.errors import DataError

GENERATOR_VERSION = 3
CLASS_NAMES = (
    "floor", "wall", "ceiling", "cabinet", "table", "chair", "sofa", "box", "pillar", "stool", "ball", "lamp",
    "picture",
)
_CLS = {name: index for index, name in enumerate(CLASS_NAMES)}
SALIENT_CLASSES = tuple(index for index, name in enumerate(CLASS_NAMES) if index >= _CLS["cabinet"]
                        and name != "picture")
SYNTHETIC_TASKS = ("semseg", "depth", "normals", "edge", "saliency")
SPLITS = ("train", "val", "test")
FOCAL_AT_640 = 518.8  # the Kinect focal length of NYUD-v2, scaled to the rendered width
# Depth step (relative to the nearer depth) between two different primitives that counts as an occlusion.
DEPTH_JUMP = 0.05
# Per class: (base RGB, RGB jitter, patterns to choose from). Patterns: 0 plain, 1 stripes, 2 checker,
# 3 wood grain, 4 planks.
_MATERIALS: dict[str, tuple[tuple[float, float, float], float, tuple[int, ...]]] = {
    "floor": ((0.55, 0.40, 0.28), 0.15, (4, 2, 3)),
    "wall": ((0.80, 0.78, 0.72), 0.12, (0, 1, 3)),
    "ceiling": ((0.92, 0.92, 0.90), 0.04, (0,)),
    "cabinet": ((0.45, 0.30, 0.18), 0.12, (3, 4)),
    "table": ((0.62, 0.45, 0.28), 0.10, (3, 0)),
    "chair": ((0.25, 0.35, 0.60), 0.15, (0, 1)),
    "sofa": ((0.55, 0.15, 0.20), 0.15, (0, 2)),
    "box": ((0.75, 0.60, 0.35), 0.12, (0, 1, 2)),
    "pillar": ((0.70, 0.70, 0.75), 0.08, (0, 1)),
    "stool": ((0.20, 0.55, 0.30), 0.15, (0, 1)),
    "ball": ((0.85, 0.55, 0.10), 0.20, (0, 2)),
    "lamp": ((0.95, 0.90, 0.60), 0.05, (0,)),
    "picture": ((0.30, 0.45, 0.55), 0.30, (2, 1, 3)),
}


_CUBE = np.array([[x, y, z] for x in (-1, 1) for y in (-1, 1) for z in (-1, 1)], np.float64)  # corners


@dataclass(frozen=True)
class Box:
    """A box turned by ``yaw`` about the vertical axis."""

    centre: np.ndarray
    half: np.ndarray
    yaw: float
    instance: int

    def _to_local(self, offset: np.ndarray) -> np.ndarray:
        return _yaw_matrix(self.yaw).T.astype(offset.dtype) @ offset

    def corners(self) -> np.ndarray:
        return self.centre + _rotate(self.yaw, (_CUBE * self.half).T).T

    def hit(self, origin: np.ndarray, rays: np.ndarray) -> np.ndarray:
        """Slab test in the box frame: entry distance per ray, inf on a miss."""
        local_origin = self._to_local(origin - self.centre)[:, None].astype(np.float32)
        half = self.half[:, None].astype(np.float32)
        inv = 1.0 / self._to_local(rays)
        t_a, t_b = (-half - local_origin) * inv, (half - local_origin) * inv
        enter = np.minimum(t_a, t_b).max(axis=0)
        leave = np.maximum(t_a, t_b).min(axis=0)
        return np.where((enter <= leave) & (enter > 1e-3), enter, np.inf)

    def normal(self, points: np.ndarray) -> np.ndarray:
        local = self._to_local(points - self.centre[:, None]) / self.half[:, None]
        axis = np.abs(local).argmax(axis=0)
        local_normal = np.zeros_like(local)
        local_normal[axis, np.arange(local.shape[1])] = np.sign(local[axis, np.arange(local.shape[1])])
        return _rotate(self.yaw, local_normal)


@dataclass(frozen=True)
class Cylinder:
    """A vertical cylinder from height ``bottom`` to ``top`` with a flat top (the bottom is never seen)."""

    x: float
    z: float
    radius: float
    bottom: float
    top: float
    instance: int

    def corners(self) -> np.ndarray:
        return np.array([[self.x + dx * self.radius, y, self.z + dz * self.radius]
                         for dx in (-1, 1) for dz in (-1, 1) for y in (self.bottom, self.top)])

    def hit(self, origin: np.ndarray, rays: np.ndarray) -> np.ndarray:
        ox, oz = origin[0] - self.x, origin[2] - self.z
        a = rays[0] * rays[0] + rays[2] * rays[2]
        b = ox * rays[0] + oz * rays[2]
        disc = b * b - a * (ox * ox + oz * oz - self.radius**2)
        with np.errstate(invalid="ignore"):
            side = (-b - np.sqrt(disc)) / a
        height = origin[1] + side * rays[1]
        side = np.where((disc >= 0) & (side > 1e-3) & (height >= self.bottom) & (height <= self.top), side, np.inf)
        cap = (self.top - origin[1]) / rays[1]
        cx, cz = ox + cap * rays[0], oz + cap * rays[2]
        cap = np.where((cap > 1e-3) & (cx * cx + cz * cz <= self.radius**2), cap, np.inf)
        return np.minimum(side, cap)

    def normal(self, points: np.ndarray) -> np.ndarray:
        radial = np.stack([points[0] - self.x, np.zeros_like(points[0]), points[2] - self.z]) / self.radius
        on_cap = (np.abs(points[1] - self.top) < 1e-4) & ((radial * radial).sum(axis=0) < 0.999)
        return np.where(on_cap, np.array([[0.0], [1.0], [0.0]], np.float32), radial)


@dataclass(frozen=True)
class Sphere:
    centre: np.ndarray
    radius: float
    instance: int

    def corners(self) -> np.ndarray:
        return self.centre + _CUBE * self.radius

    def hit(self, origin: np.ndarray, rays: np.ndarray) -> np.ndarray:
        rel = (origin - self.centre).astype(np.float32)
        a = (rays * rays).sum(axis=0)
        b = rel @ rays
        disc = b * b - a * (rel @ rel - self.radius**2)
        with np.errstate(invalid="ignore"):
            t = (-b - np.sqrt(disc)) / a
        return np.where((disc >= 0) & (t > 1e-3), t, np.inf)

    def normal(self, points: np.ndarray) -> np.ndarray:
        return (points - self.centre[:, None]) / self.radius


Primitive = Box | Cylinder | Sphere


@dataclass
class Scene:
    """A furnished room. World frame: y up, the room spans [0, size] on each axis."""

    size: np.ndarray  # (3,) width (x), height (y), depth (z)
    light: np.ndarray  # (3,) position of the point light
    light_power: float
    ambient: float
    # Per instance: class id and material. Instances 0..5: floor, ceiling, walls x=0, x=W, z=0, z=D.
    classes: list[int] = field(default_factory=list)
    colour1: list[np.ndarray] = field(default_factory=list)
    colour2: list[np.ndarray] = field(default_factory=list)
    pattern: list[int] = field(default_factory=list)
    frequency: list[float] = field(default_factory=list)
    primitives: list[Primitive] = field(default_factory=list)

    def add_instance(self, rng: np.random.Generator, class_name: str) -> int:
        base, jitter, patterns = _MATERIALS[class_name]
        colour = np.clip(np.asarray(base) + rng.uniform(-jitter, jitter, 3), 0.05, 1.0)
        self.classes.append(_CLS[class_name])
        self.colour1.append(colour)
        self.colour2.append(np.clip(colour * rng.uniform(0.55, 0.85) + rng.uniform(-0.08, 0.08, 3), 0.02, 1))
        self.pattern.append(patterns[int(rng.integers(len(patterns)))])
        self.frequency.append(float(rng.uniform(2.0, 8.0)))
        return len(self.classes) - 1


@dataclass(frozen=True)
class Camera:
    """A pinhole camera: ``forward``/``right``/``up`` are its orthonormal axes in the world frame."""

    position: np.ndarray
    forward: np.ndarray
    right: np.ndarray
    up: np.ndarray


def look_at(position: np.ndarray, target: np.ndarray, roll: float = 0.0) -> Camera:
    """A camera at ``position`` looking at ``target`` (world y up), rolled by ``roll`` radians."""
    forward = target - position
    forward = forward / np.linalg.norm(forward)
    right = np.cross(forward, np.array([0.0, 1.0, 0.0]))
    right = right / np.linalg.norm(right)
    up = np.cross(right, forward)
    right, up = np.cos(roll) * right + np.sin(roll) * up, -np.sin(roll) * right + np.cos(roll) * up
    return Camera(position, forward, right, up)


@lru_cache(maxsize=8)
def _camera_rays(height: int, width: int) -> np.ndarray:
    """Ray directions in the camera frame (right, up, forward), forward component 1, shape 3 x H*W."""
    focal = FOCAL_AT_640 * width / 640.0
    cols = (np.arange(width, dtype=np.float32) + 0.5 - width / 2) / focal
    rows = -(np.arange(height, dtype=np.float32) + 0.5 - height / 2) / focal
    grid_x, grid_y = np.meshgrid(cols, rows)
    return np.stack([grid_x.ravel(), grid_y.ravel(), np.ones(height * width, np.float32)])


# ----------------------------------------------------------------------------------------------- layout


class _Floor:
    """Occupied floor discs, to place furniture without overlaps and away from the camera path."""

    def __init__(self, size: np.ndarray, cameras: list[Camera]) -> None:
        self.size = size
        self.discs = [(float(camera.position[0]), float(camera.position[2]), 0.45) for camera in cameras]
        self.eye = cameras[0].position[[0, 2]]
        self.heading = float(np.arctan2(cameras[0].forward[2], cameras[0].forward[0]))

    def _free(self, x: float, z: float, radius: float) -> bool:
        return all((x - ox) ** 2 + (z - oz) ** 2 >= (radius + r + 0.05) ** 2 for ox, oz, r in self.discs)

    def place(self, rng: np.random.Generator, radius: float, wall_offset: float | None = None
              ) -> tuple[float, float, float]:
        """(x, z, yaw) of a free spot for an object of bounding ``radius``, or NaNs when none was found.

        With ``wall_offset`` the object stands with its centre that far from a random wall, facing the room
        (its local +z axis points away from the wall); otherwise anywhere, turned at random.
        """
        width, _, depth = self.size
        for _ in range(25):
            if wall_offset is not None:
                wall = int(rng.integers(4))
                along = rng.uniform(radius, max((width if wall >= 2 else depth) - radius, radius + 1e-3))
                x, z, yaw = {
                    0: (wall_offset, along, np.pi / 2),
                    1: (width - wall_offset, along, -np.pi / 2),
                    2: (along, wall_offset, 0.0),
                    3: (along, depth - wall_offset, np.pi),
                }[wall]
            else:
                yaw = rng.uniform(0, 2 * np.pi)
                if rng.random() < 0.7:  # mostly in the first camera's field of view, so that frames are busy
                    angle, distance = self.heading + rng.uniform(-0.5, 0.5), rng.uniform(1.2, 5.5)
                    x, z = self.eye + distance * np.array([np.cos(angle), np.sin(angle)])
                else:
                    x, z = rng.uniform(radius, width - radius), rng.uniform(radius, depth - radius)
                if not (radius <= x <= width - radius and radius <= z <= depth - radius):
                    continue
            if self._free(x, z, radius):
                self.discs.append((x, z, radius))
                return x, z, yaw
        return float("nan"), float("nan"), 0.0


def _yaw_matrix(yaw: float) -> np.ndarray:
    """Rotation by ``yaw`` about the vertical axis (local +z turns towards world +x)."""
    cos, sin = np.cos(yaw), np.sin(yaw)
    return np.array([[cos, 0.0, sin], [0.0, 1.0, 0.0], [-sin, 0.0, cos]])


def _rotate(yaw: float, local: np.ndarray) -> np.ndarray:
    """Local (x, y, z) offsets (3 or 3 x K) -> world offsets for an object turned by ``yaw`` about y."""
    return _yaw_matrix(yaw).astype(local.dtype) @ local


def _add_part(scene: Scene, base: np.ndarray, yaw: float, offset: tuple, half: tuple, inst: int) -> None:
    scene.primitives.append(Box(base + _rotate(yaw, np.asarray(offset, float)), np.asarray(half, float), yaw, inst))


def _furnish(scene: Scene, rng: np.random.Generator, floor: _Floor) -> None:
    """Place a random set of furniture built from boxes, cylinders and spheres."""
    height = scene.size[1]
    kinds = ["table", "chair", "cabinet", "sofa", "box", "pillar", "stool", "ball", "lamp"]
    weights = np.array([1.2, 1.5, 1.0, 0.6, 1.2, 0.4, 0.8, 0.8, 0.5])
    for kind in rng.choice(kinds, size=int(rng.integers(5, 12)), p=weights / weights.sum()):
        if kind == "table":
            half_w, half_d, top = rng.uniform(0.4, 0.8), rng.uniform(0.3, 0.5), rng.uniform(0.65, 0.8)
            x, z, yaw = floor.place(rng, float(np.hypot(half_w, half_d)))
            if np.isnan(x):
                continue
            inst, base = scene.add_instance(rng, "table"), np.array([x, 0.0, z])
            _add_part(scene, base, yaw, (0, top - 0.03, 0), (half_w, 0.03, half_d), inst)
            for side in (-1, 1):
                _add_part(scene, base, yaw, (side * (half_w - 0.06), (top - 0.06) / 2, 0),
                          (0.03, (top - 0.06) / 2, half_d - 0.05), inst)
            if rng.random() < 0.5:  # something on the table
                on_top = base + _rotate(yaw, np.array([rng.uniform(-0.5, 0.5) * half_w, 0, rng.uniform(
                    -0.5, 0.5) * half_d]))
                if rng.random() < 0.5:
                    size = rng.uniform(0.08, 0.18)
                    scene.primitives.append(Box(on_top + np.array([0, top + size, 0]), np.full(3, size),
                                                yaw + rng.uniform(-0.5, 0.5), scene.add_instance(rng, "box")))
                else:
                    radius = rng.uniform(0.08, 0.16)
                    scene.primitives.append(Sphere(on_top + np.array([0, top + radius, 0]), radius,
                                                   scene.add_instance(rng, "ball")))
        elif kind == "chair":
            seat, half = rng.uniform(0.42, 0.5), rng.uniform(0.2, 0.26)
            x, z, yaw = floor.place(rng, half * 1.45)
            if np.isnan(x):
                continue
            inst, base = scene.add_instance(rng, "chair"), np.array([x, 0.0, z])
            _add_part(scene, base, yaw, (0, seat - 0.025, 0), (half, 0.025, half), inst)
            back = rng.uniform(0.35, 0.5) / 2
            _add_part(scene, base, yaw, (0, seat + back, -half + 0.025), (half, back, 0.025), inst)
            for side in (-1, 1):
                _add_part(scene, base, yaw, (side * (half - 0.025), (seat - 0.05) / 2, 0),
                          (0.025, (seat - 0.05) / 2, half - 0.02), inst)
        elif kind in ("cabinet", "sofa"):
            half_w = rng.uniform(0.3, 0.7) if kind == "cabinet" else rng.uniform(0.7, 1.0)
            half_d = rng.uniform(0.2, 0.3) if kind == "cabinet" else rng.uniform(0.4, 0.5)
            x, z, yaw = floor.place(rng, float(np.hypot(half_w, half_d)), wall_offset=half_d + 0.01)
            if np.isnan(x):
                continue
            base = np.array([x, 0.0, z])
            inst = scene.add_instance(rng, kind)
            if kind == "cabinet":
                tall = rng.uniform(0.4, 1.0)
                _add_part(scene, base, yaw, (0, tall, 0), (half_w, tall, half_d), inst)
            else:
                _add_part(scene, base, yaw, (0, 0.22, 0.05), (half_w, 0.22, half_d - 0.05), inst)
                _add_part(scene, base, yaw, (0, 0.42, -half_d + 0.1), (half_w, 0.42, 0.1), inst)
        elif kind == "box":
            size = rng.uniform(0.12, 0.3)
            x, z, yaw = floor.place(rng, size * 1.42)
            if np.isnan(x):
                continue
            half = size * rng.uniform(0.8, 1.2, 3)
            scene.primitives.append(Box(np.array([x, half[1], z]), half, yaw, scene.add_instance(rng, "box")))
        elif kind in ("pillar", "stool"):
            radius = rng.uniform(0.1, 0.25) if kind == "pillar" else rng.uniform(0.15, 0.28)
            x, z, _ = floor.place(rng, radius)
            if np.isnan(x):
                continue
            top = height if kind == "pillar" else rng.uniform(0.4, 0.75)
            scene.primitives.append(Cylinder(x, z, radius, 0.0, top, scene.add_instance(rng, kind)))
        elif kind == "ball":
            radius = rng.uniform(0.12, 0.35)
            x, z, _ = floor.place(rng, radius)
            if not np.isnan(x):
                scene.primitives.append(Sphere(np.array([x, radius, z]), radius, scene.add_instance(rng, "ball")))
        else:  # lamp: a pole with a round shade
            x, z, _ = floor.place(rng, 0.25)
            if np.isnan(x):
                continue
            inst, pole = scene.add_instance(rng, "lamp"), rng.uniform(1.2, 1.7)
            scene.primitives.append(Cylinder(x, z, 0.025, 0.0, pole, inst))
            scene.primitives.append(Sphere(np.array([x, pole + 0.15, z]), 0.2, inst))
    for _ in range(int(rng.integers(1, 5))):  # pictures hang on the walls
        wall = int(rng.integers(4))
        half_w, half_h = rng.uniform(0.25, 0.7), rng.uniform(0.2, 0.5)
        length = scene.size[0] if wall >= 2 else scene.size[2]
        along = rng.uniform(half_w + 0.1, length - half_w - 0.1)
        up = rng.uniform(0.9 + half_h, height - half_h - 0.15)
        thick = rng.uniform(0.005, 0.02)  # distinct for each picture, so overlapping ones never tie in depth
        inst = scene.add_instance(rng, "picture")
        centre, half = {
            0: (np.array([thick, up, along]), np.array([thick, half_h, half_w])),
            1: (np.array([scene.size[0] - thick, up, along]), np.array([thick, half_h, half_w])),
            2: (np.array([along, up, thick]), np.array([half_w, half_h, thick])),
            3: (np.array([along, up, scene.size[2] - thick]), np.array([half_w, half_h, thick])),
        }[wall]
        scene.primitives.append(Box(centre, half, 0.0, inst))


def _sample_room(rng: np.random.Generator) -> Scene:
    size = np.array([rng.uniform(3.5, 6.5), rng.uniform(2.4, 3.2), rng.uniform(4.0, 8.0)])
    light = np.array([rng.uniform(0.3, 0.7) * size[0], size[1] - 0.3, rng.uniform(0.3, 0.7) * size[2]])
    scene = Scene(size=size, light=light, light_power=float(rng.uniform(2.5, 6.0)),
                  ambient=float(rng.uniform(0.15, 0.35)))
    for name in ("floor", "ceiling", "wall", "wall", "wall", "wall"):
        scene.add_instance(rng, name)
    if rng.random() < 0.6:  # walls of one room usually share one paint
        for index in range(3, 6):
            scene.colour1[index], scene.colour2[index] = scene.colour1[2], scene.colour2[2]
            scene.pattern[index], scene.frequency[index] = scene.pattern[2], scene.frequency[2]
    return scene


def _sample_path(rng: np.random.Generator, size: np.ndarray, length: int) -> list[Camera]:
    """A camera path: a slow straight move with a smoothly turning view (one pose when ``length`` is 1)."""
    margin = 0.6
    start = np.array([rng.uniform(margin, size[0] - margin), rng.uniform(1.0, 1.7),
                      rng.uniform(margin, size[2] - margin)])
    # Look towards the far side of the room so that the furniture in the middle is in view.
    centre = np.array([size[0] / 2, 0.0, size[2] / 2])
    aim = centre + (centre - start) * rng.uniform(0.2, 0.8) + np.array([rng.uniform(-1, 1), 0, rng.uniform(
        -1, 1)])
    aim[1] = rng.uniform(0.2, 1.5)
    speed, turn = rng.uniform(0.02, 0.05), rng.uniform(-0.4, 0.4)
    heading = rng.uniform(0, 2 * np.pi)
    direction = np.array([np.cos(heading), rng.uniform(-0.1, 0.1), np.sin(heading)])
    roll = rng.uniform(-0.05, 0.05)
    cameras = []
    for step in range(length):
        position = start + direction * speed * step
        position[[0, 2]] = np.clip(position[[0, 2]], [0.4, 0.4], [size[0] - 0.4, size[2] - 0.4])
        offset = aim - position
        angle = turn * step / max(length - 1, 1)
        target = position + np.array([np.cos(angle) * offset[0] - np.sin(angle) * offset[2], offset[1],
                                      np.sin(angle) * offset[0] + np.cos(angle) * offset[2]])
        cameras.append(look_at(position, target, roll))
    return cameras


def sample_scene(rng: np.random.Generator, length: int = 1) -> tuple[Scene, list[Camera]]:
    """A furnished room and ``length`` camera poses moving smoothly through it (free of furniture)."""
    scene = _sample_room(rng)
    cameras = _sample_path(rng, scene.size, length)
    _furnish(scene, rng, _Floor(scene.size, cameras))
    return scene, cameras


# --------------------------------------------------------------------------------------------- rendering


def _project(camera: Camera, points: np.ndarray, height: int, width: int) -> tuple[slice, slice] | None:
    """The image window (rows, cols) holding the projection of ``points`` (K x 3), None when outside.

    The whole image when some point is behind or too near the camera (a conservative bound).
    """
    rel = points - camera.position
    depth = rel @ camera.forward
    if depth.max() < 0.05:
        return None
    if depth.min() < 0.05:
        return slice(0, height), slice(0, width)
    focal = FOCAL_AT_640 * width / 640.0
    cols = focal * (rel @ camera.right) / depth + width / 2
    rows = -focal * (rel @ camera.up) / depth + height / 2
    row0, row1 = max(int(np.floor(rows.min())), 0), min(int(np.ceil(rows.max())) + 1, height)
    col0, col1 = max(int(np.floor(cols.min())), 0), min(int(np.ceil(cols.max())) + 1, width)
    if row0 >= row1 or col0 >= col1:
        return None
    return slice(row0, row1), slice(col0, col1)


def _cast(scene: Scene, camera: Camera, rays: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray,
                                                                       np.ndarray]:
    """Z-buffer over primitives: depth (H, W), world normals (3, H, W), instance and primitive ids (H, W).

    ``rays`` (3, H, W) are world directions whose forward component is 1, so the ray parameter is the
    z-depth. The room comes first (the camera is inside it, so every ray hits it), then each primitive is
    intersected with the rays of its projected bounding window only.
    """
    height, width = rays.shape[1:]
    origin = camera.position.astype(np.float32)
    size = scene.size.astype(np.float32)
    positive = rays > 0
    room = (np.where(positive, size[:, None, None], np.float32(0)) - origin[:, None, None]) / rays
    depth = np.minimum(np.minimum(room[0], room[1]), room[2])
    hit_x = room[0] == depth
    hit_y = ~hit_x & (room[1] == depth)
    hit_z = ~hit_x & ~hit_y
    normals = np.where(positive, np.float32(-1), np.float32(1)) * np.stack([hit_x, hit_y, hit_z])
    # Room faces: floor 0, ceiling 1, walls x=0 / x=W 2 / 3, walls z=0 / z=D 4 / 5.
    instance = np.where(hit_x, 2 + positive[0], np.where(hit_y, positive[1], 4 + positive[2])).astype(np.int64)
    primitive = instance.copy()
    for number, shape in enumerate(scene.primitives, start=6):
        window = _project(camera, shape.corners(), height, width)
        if window is None:
            continue
        win_rays = rays[:, window[0], window[1]]
        t = shape.hit(origin, win_rays.reshape(3, -1)).reshape(win_rays.shape[1:])
        closer = t < depth[window]
        if not closer.any():
            continue
        depth[window] = np.where(closer, t, depth[window])
        points = origin[:, None] + win_rays[:, closer] * t[closer]
        normals[:, window[0], window[1]][:, closer] = shape.normal(points)
        instance[window][closer] = shape.instance
        primitive[window][closer] = number
    return depth, normals, instance, primitive


def _pattern(kind: int, s: np.ndarray, t: np.ndarray) -> np.ndarray:
    """Texture pattern ``kind`` in [0, 1] at texture coordinates (s, t): stripes, checker, grain, planks."""
    if kind == 1:
        return np.floor(s) % 2
    if kind == 2:
        return (np.floor(s) + np.floor(t)) % 2
    if kind == 3:
        return 0.5 + 0.5 * np.sin(s * 3.0 + 1.5 * np.sin(t * 0.7 + s * 0.3))
    plank = np.sin(np.floor(s) * 12.9898 + 78.233) * 43758.5453
    return (plank - np.floor(plank)) * 0.8 + 0.2 * (np.abs(s - np.floor(s) - 0.5) > 0.46)


def _albedo(scene: Scene, points: np.ndarray, normals: np.ndarray, instance: np.ndarray) -> np.ndarray:
    """Procedural textures: per-instance pattern in the plane the surface mostly faces, (3, N) in [0, 1]."""
    magnitude = np.abs(normals)
    facing_x = (magnitude[0] >= magnitude[1]) & (magnitude[0] >= magnitude[2])
    facing_y = (magnitude[1] > magnitude[0]) & (magnitude[1] >= magnitude[2])
    freq = np.asarray(scene.frequency, np.float32)[instance]
    s = np.where(facing_x, points[2], points[0]) * freq
    t = np.where(facing_y, points[2], points[1]) * freq
    kinds = np.asarray(scene.pattern)[instance]
    mix = np.zeros_like(s)
    for kind in range(1, 5):
        mask = kinds == kind
        if mask.any():
            mix[mask] = _pattern(kind, s[mask], t[mask])
    colour1 = np.asarray(scene.colour1, np.float32).T[:, instance]
    colour2 = np.asarray(scene.colour2, np.float32).T[:, instance]
    return colour1 + (colour2 - colour1) * mix


_GAMMA = (np.linspace(0, 1, 4096) ** (1 / 1.4) * 255 + 0.5).astype(np.uint8)  # linear -> display


def render(scene: Scene, camera: Camera, height: int, width: int, rng: np.random.Generator) -> dict[str, Any]:
    """Render one view: image (uint8 H x W x 3) and every label, plus ``instance`` (H x W)."""
    basis = np.stack([camera.right, camera.up, camera.forward], axis=1).astype(np.float32)
    rays = (basis @ _camera_rays(height, width)).reshape(3, height, width)
    rays[np.abs(rays) < 1e-9] = 1e-9
    depth, normals, instance, primitive = _cast(scene, camera, rays)
    flat_normals = normals.reshape(3, -1)
    points = camera.position[:, None].astype(np.float32) + rays.reshape(3, -1) * depth.reshape(-1)
    to_light = scene.light[:, None].astype(np.float32) - points
    distance2 = (to_light * to_light).sum(axis=0)
    lambert = np.maximum((flat_normals * to_light).sum(axis=0), 0) / np.sqrt(distance2)
    shade = scene.ambient + scene.light_power * lambert / (1.0 + 0.4 * distance2) + 0.1 * flat_normals[1]
    colour = _albedo(scene, points, flat_normals, instance.reshape(-1)) * shade
    colour += rng.standard_normal(colour.shape, dtype=np.float32) * 0.01
    image = _GAMMA[(np.clip(colour, 0, 1) * (len(_GAMMA) - 1) + 0.5).astype(np.int64)]
    camera_normals = (basis.T @ flat_normals) * np.array([[1.0], [1.0], [-1.0]], np.float32)
    semseg = np.asarray(scene.classes, np.uint8)[instance]
    return {
        "image": image.T.reshape(height, width, 3),
        "semseg": semseg,
        "depth": depth,
        "normals": camera_normals.reshape(3, height, width),
        "edge": boundaries(semseg, instance, primitive, depth),
        "saliency": np.isin(semseg, SALIENT_CLASSES).astype(np.uint8),
        "instance": instance.astype(np.uint16),
    }


def boundaries(semseg: np.ndarray, instance: np.ndarray, primitive: np.ndarray, depth: np.ndarray) -> np.ndarray:
    """One-pixel-thin boundaries (uint8 0/1) between 4-neighbours that differ in class or instance, or
    belong to different primitives with a depth jump; of each such pair the nearer pixel is marked."""
    edge = np.zeros(semseg.shape, bool)
    for axis in (0, 1):
        first = [slice(None), slice(None)]
        second = [slice(None), slice(None)]
        first[axis], second[axis] = slice(None, -1), slice(1, None)
        first, second = tuple(first), tuple(second)
        near = np.minimum(depth[first], depth[second])
        differ = (semseg[first] != semseg[second]) | (instance[first] != instance[second]) | (
            (primitive[first] != primitive[second]) & (np.abs(depth[first] - depth[second]) > DEPTH_JUMP * near))
        first_nearer = depth[first] <= depth[second]
        edge[first] |= differ & first_nearer
        edge[second] |= differ & ~first_nearer
    return edge.astype(np.uint8)


# ------------------------------------------------------------------------------------- frames and caching


def _split_stream(split: str) -> int:
    streams = {"train": 0, "val": 1, "test": 2, "clips": 3}
    if split not in streams:
        raise DataError(f"synthetic dataset: unknown split '{split}' (known: {', '.join(streams)})")
    return streams[split]


def render_frame(config: SyntheticConfig, split: str, index: int) -> dict[str, Any]:
    """Frame ``index`` of ``split``: a fresh scene and camera drawn from ``(seed, split, index)``."""
    rng = np.random.default_rng([config.seed, _split_stream(split), index])
    scene, cameras = sample_scene(rng, 1)
    return render(scene, cameras[0], config.height, config.width, rng)


def render_clip(config: SyntheticConfig, clip_index: int) -> list[dict[str, Any]]:
    """Clip ``clip_index``: ``config.clip_length`` consecutive frames of one scene, camera moving smoothly."""
    rng = np.random.default_rng([config.seed, _split_stream("clips"), clip_index])
    scene, cameras = sample_scene(rng, config.clip_length)
    return [render(scene, camera, config.height, config.width, rng) for camera in cameras]


def split_size(config: SyntheticConfig, split: str) -> int:
    """Number of frames of a split (clips: clips x frames per clip)."""
    sizes = {"train": config.num_train, "val": config.num_val, "test": config.num_test,
             "clips": config.num_clips * config.clip_length}
    _split_stream(split)
    return sizes[split]


def cache_dir(config: SyntheticConfig) -> Path:
    """``config.cache_dir``, else ``$DENSEMTL_CACHE``, else ``~/.cache/densemtl``."""
    root = config.cache_dir or os.environ.get("DENSEMTL_CACHE") or Path.home() / ".cache" / "densemtl"
    return Path(root).expanduser()


def cache_path(config: SyntheticConfig, split: str) -> Path:
    """The cache file of a split, named by a hash of every parameter that changes its content."""
    params = {"version": GENERATOR_VERSION, "split": split, "height": config.height, "width": config.width,
              "seed": config.seed, "frames": split_size(config, split)}
    if split == "clips":
        params.update(num_clips=config.num_clips, clip_length=config.clip_length)
    key = hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()[:16]
    return cache_dir(config) / f"synthetic-{split}-{config.height}x{config.width}-{key}.npz"


def _generate(config: SyntheticConfig, split: str) -> dict[str, np.ndarray]:
    if split == "clips":
        frames = []
        for clip in tqdm(range(config.num_clips), desc="synthetic clips", unit="clip"):
            frames.extend(render_clip(config, clip))
    else:
        frames = [render_frame(config, split, index)
                  for index in tqdm(range(split_size(config, split)), desc=f"synthetic {split}", unit="frame")]
    return {key: np.stack([frame[key] for frame in frames]) for key in ("image", *SYNTHETIC_TASKS)}


def load_split(config: SyntheticConfig, split: str) -> dict[str, np.ndarray]:
    """All frames of ``split`` as stacked arrays, rendered on first use and cached as compressed npz."""
    if split_size(config, split) <= 0:
        raise DataError(f"synthetic split '{split}' is empty: check data.synthetic (num_train / num_val / "
                        f"num_test, or num_clips and clip_length)")
    path = cache_path(config, split)
    if path.is_file():
        try:
            with np.load(path) as data:
                return {key: data[key] for key in data.files}
        except (OSError, ValueError, EOFError) as err:
            raise DataError(f"{path}: corrupt synthetic cache ({err}); delete it to regenerate") from None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handle, tmp = tempfile.mkstemp(dir=path.parent, suffix=".npz.tmp")
    except OSError as err:
        raise DataError(f"synthetic cache dir {path.parent} is not writable ({err.strerror}); set "
                        f"data.synthetic.cache_dir or $DENSEMTL_CACHE") from None
    try:
        with os.fdopen(handle, "wb") as file:
            arrays = _generate(config, split)
            np.savez_compressed(file, **arrays)
        os.replace(tmp, path)
    except OSError as err:
        raise DataError(f"{path}: cannot write the synthetic cache ({err.strerror})") from None
    finally:
        Path(tmp).unlink(missing_ok=True)
    return arrays


def synthetic_info() -> DatasetInfo:
    return DatasetInfo(name="synthetic", tasks=SYNTHETIC_TASKS, num_classes={"semseg": len(CLASS_NAMES)},
                       class_names={"semseg": list(CLASS_NAMES)}, boundary_max_dist=0.011)


def _frame_targets(arrays: dict[str, np.ndarray], index: int, tasks: list[str]) -> dict[str, Any]:
    """One cached frame as a raw sample (the transforms' input format) with the requested tasks."""
    sample: dict[str, Any] = {"image": arrays["image"][index]}
    for task in tasks:
        value = arrays[task][index]
        sample[task] = value.astype(np.int64) if task == "semseg" else value.astype(np.float32)
    return sample


def _check_tasks(tasks: list[str]) -> list[str]:
    missing = [task for task in tasks if task not in SYNTHETIC_TASKS]
    if missing:
        raise DataError(f"synthetic dataset has no labels for {', '.join(missing)} (it has: "
                        f"{', '.join(SYNTHETIC_TASKS)})")
    return list(tasks)


class SyntheticDataset(Dataset):
    """Frames of one split in the sample contract format; ``train`` turns on the data config's augmentation."""

    def __init__(self, data_config: DataConfig, split: str, train: bool) -> None:
        if split not in SPLITS:
            raise DataError(f"synthetic dataset: unknown split '{split}' (known: {', '.join(SPLITS)})")
        self.info = synthetic_info()
        self.split = split
        self.tasks = _check_tasks(data_config.tasks)
        self.arrays = load_split(data_config.synthetic, split)
        self.transform = build_transform(data_config, train=train)

    def __len__(self) -> int:
        return len(self.arrays["image"])

    def __getitem__(self, index: int) -> dict[str, Any]:
        sample = _frame_targets(self.arrays, index, self.tasks)
        sample["meta"] = {"name": f"{self.split}_{index:05d}"}
        return self.transform(sample, index)


class SyntheticClips(Dataset):
    """Video clips: item ``i`` is the list of ``clip_length`` consecutive samples of clip ``i`` (no
    augmentation; ``meta`` also holds ``clip`` and ``frame``)."""

    def __init__(self, data_config: DataConfig) -> None:
        self.info = synthetic_info()
        self.tasks = _check_tasks(data_config.tasks)
        self.config = data_config.synthetic
        self.arrays = load_split(data_config.synthetic, "clips")
        self.transform = build_transform(data_config, train=False)

    def __len__(self) -> int:
        return self.config.num_clips

    def __getitem__(self, clip: int) -> list[dict[str, Any]]:
        if not 0 <= clip < len(self):
            raise IndexError(clip)
        frames = []
        for frame in range(self.config.clip_length):
            sample = _frame_targets(self.arrays, clip * self.config.clip_length + frame, self.tasks)
            sample["meta"] = {"name": f"clip{clip:03d}_{frame:04d}", "clip": clip, "frame": frame}
            frames.append(self.transform(sample))
        return frames

