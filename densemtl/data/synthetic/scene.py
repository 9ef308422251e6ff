"""Random furnished rooms and camera paths: what a synthetic frame shows, before it is rendered.

A room is a box (floor, ceiling, four walls) holding furniture assembled from primitives (tables,
chairs, cabinets, sofas, boxes, pillars, stools, balls, lamps) and pictures on the walls. Every
instance draws a material (colours and a texture pattern) for the renderer. All draws come from one
``numpy`` generator in a fixed order, so a scene is a function of the generator's seed.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace

import numpy as np

from densemtl.data.synthetic.geometry import Box, Camera, Cylinder, Primitive, Sphere, look_at, rotate

CLASS_NAMES = (
    "floor", "wall", "ceiling", "cabinet", "table", "chair", "sofa", "box", "pillar", "stool", "ball", "lamp",
    "picture",
)
_CLS = {name: index for index, name in enumerate(CLASS_NAMES)}
SALIENT_CLASSES = tuple(index for index, name in enumerate(CLASS_NAMES) if index >= _CLS["cabinet"]
                        and name != "picture")
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


def _add_part(scene: Scene, base: np.ndarray, yaw: float, offset: tuple, half: tuple, inst: int) -> None:
    scene.primitives.append(Box(base + rotate(yaw, np.asarray(offset, float)), np.asarray(half, float), yaw, inst))


# Each piece of furniture: ``place(scene, rng, floor, kind)`` draws its size, finds it a free spot (or
# gives up) and adds its primitives; ``kind`` is its class name.


def _table(scene: Scene, rng: np.random.Generator, floor: _Floor, kind: str) -> None:
    """A top on two side panels, sometimes with a box or a ball on it."""
    half_w, half_d, top = rng.uniform(0.4, 0.8), rng.uniform(0.3, 0.5), rng.uniform(0.65, 0.8)
    x, z, yaw = floor.place(rng, float(np.hypot(half_w, half_d)))
    if np.isnan(x):
        return
    inst, base = scene.add_instance(rng, kind), np.array([x, 0.0, z])
    _add_part(scene, base, yaw, (0, top - 0.03, 0), (half_w, 0.03, half_d), inst)
    for side in (-1, 1):
        _add_part(scene, base, yaw, (side * (half_w - 0.06), (top - 0.06) / 2, 0),
                  (0.03, (top - 0.06) / 2, half_d - 0.05), inst)
    if rng.random() < 0.5:  # something on the table
        on_top = base + rotate(yaw, np.array([rng.uniform(-0.5, 0.5) * half_w, 0, rng.uniform(
            -0.5, 0.5) * half_d]))
        if rng.random() < 0.5:
            size = rng.uniform(0.08, 0.18)
            scene.primitives.append(Box(on_top + np.array([0, top + size, 0]), np.full(3, size),
                                        yaw + rng.uniform(-0.5, 0.5), scene.add_instance(rng, "box")))
        else:
            radius = rng.uniform(0.08, 0.16)
            scene.primitives.append(Sphere(on_top + np.array([0, top + radius, 0]), radius,
                                           scene.add_instance(rng, "ball")))


def _chair(scene: Scene, rng: np.random.Generator, floor: _Floor, kind: str) -> None:
    """A seat, a back and two side panels."""
    seat, half = rng.uniform(0.42, 0.5), rng.uniform(0.2, 0.26)
    x, z, yaw = floor.place(rng, half * 1.45)
    if np.isnan(x):
        return
    inst, base = scene.add_instance(rng, kind), np.array([x, 0.0, z])
    _add_part(scene, base, yaw, (0, seat - 0.025, 0), (half, 0.025, half), inst)
    back = rng.uniform(0.35, 0.5) / 2
    _add_part(scene, base, yaw, (0, seat + back, -half + 0.025), (half, back, 0.025), inst)
    for side in (-1, 1):
        _add_part(scene, base, yaw, (side * (half - 0.025), (seat - 0.05) / 2, 0),
                  (0.025, (seat - 0.05) / 2, half - 0.02), inst)


def _against_wall(scene: Scene, rng: np.random.Generator, floor: _Floor, kind: str) -> None:
    """A cabinet (one block) or a sofa (seat and back), standing against a wall and facing the room."""
    half_w = rng.uniform(0.3, 0.7) if kind == "cabinet" else rng.uniform(0.7, 1.0)
    half_d = rng.uniform(0.2, 0.3) if kind == "cabinet" else rng.uniform(0.4, 0.5)
    x, z, yaw = floor.place(rng, float(np.hypot(half_w, half_d)), wall_offset=half_d + 0.01)
    if np.isnan(x):
        return
    base = np.array([x, 0.0, z])
    inst = scene.add_instance(rng, kind)
    if kind == "cabinet":
        tall = rng.uniform(0.4, 1.0)
        _add_part(scene, base, yaw, (0, tall, 0), (half_w, tall, half_d), inst)
    else:
        _add_part(scene, base, yaw, (0, 0.22, 0.05), (half_w, 0.22, half_d - 0.05), inst)
        _add_part(scene, base, yaw, (0, 0.42, -half_d + 0.1), (half_w, 0.42, 0.1), inst)


def _box(scene: Scene, rng: np.random.Generator, floor: _Floor, kind: str) -> None:
    size = rng.uniform(0.12, 0.3)
    x, z, yaw = floor.place(rng, size * 1.42)
    if np.isnan(x):
        return
    half = size * rng.uniform(0.8, 1.2, 3)
    scene.primitives.append(Box(np.array([x, half[1], z]), half, yaw, scene.add_instance(rng, kind)))


def _post(scene: Scene, rng: np.random.Generator, floor: _Floor, kind: str) -> None:
    """A vertical cylinder: a pillar up to the ceiling or a stool."""
    radius = rng.uniform(0.1, 0.25) if kind == "pillar" else rng.uniform(0.15, 0.28)
    x, z, _ = floor.place(rng, radius)
    if np.isnan(x):
        return
    top = scene.size[1] if kind == "pillar" else rng.uniform(0.4, 0.75)
    scene.primitives.append(Cylinder(x, z, radius, 0.0, top, scene.add_instance(rng, kind)))


def _ball(scene: Scene, rng: np.random.Generator, floor: _Floor, kind: str) -> None:
    radius = rng.uniform(0.12, 0.35)
    x, z, _ = floor.place(rng, radius)
    if not np.isnan(x):
        scene.primitives.append(Sphere(np.array([x, radius, z]), radius, scene.add_instance(rng, kind)))


def _lamp(scene: Scene, rng: np.random.Generator, floor: _Floor, kind: str) -> None:
    """A pole with a round shade."""
    x, z, _ = floor.place(rng, 0.25)
    if np.isnan(x):
        return
    inst, pole = scene.add_instance(rng, kind), rng.uniform(1.2, 1.7)
    scene.primitives.append(Cylinder(x, z, 0.025, 0.0, pole, inst))
    scene.primitives.append(Sphere(np.array([x, pole + 0.15, z]), 0.2, inst))


# Furniture kind -> (relative frequency, builder). The order is part of the generator: it fixes the draws.
_FURNITURE: dict[str, tuple[float, Callable[[Scene, np.random.Generator, _Floor, str], None]]] = {
    "table": (1.2, _table),
    "chair": (1.5, _chair),
    "cabinet": (1.0, _against_wall),
    "sofa": (0.6, _against_wall),
    "box": (1.2, _box),
    "pillar": (0.4, _post),
    "stool": (0.8, _post),
    "ball": (0.8, _ball),
    "lamp": (0.5, _lamp),
}


def _hang_pictures(scene: Scene, rng: np.random.Generator) -> None:
    """One to four thin boxes on random walls."""
    height = scene.size[1]
    for _ in range(int(rng.integers(1, 5))):
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


def _furnish(scene: Scene, rng: np.random.Generator, floor: _Floor) -> None:
    """Place a random set of furniture built from boxes, cylinders and spheres, then the pictures."""
    kinds = list(_FURNITURE)
    weights = np.array([weight for weight, _ in _FURNITURE.values()])
    for kind in rng.choice(kinds, size=int(rng.integers(5, 12)), p=weights / weights.sum()):
        _FURNITURE[kind][1](scene, rng, floor, kind)
    _hang_pictures(scene, rng)


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


def _sample_path(rng: np.random.Generator, size: np.ndarray, length: int, pace: float = 1.0) -> list[Camera]:
    """A camera path: a slow straight move with a smoothly turning view (one pose when ``length`` is 1);
    ``pace`` scales the speed and the turn (0: a static camera), after the same draws."""
    margin = 0.6
    start = np.array([rng.uniform(margin, size[0] - margin), rng.uniform(1.0, 1.7),
                      rng.uniform(margin, size[2] - margin)])
    # Look towards the far side of the room so that the furniture in the middle is in view.
    centre = np.array([size[0] / 2, 0.0, size[2] / 2])
    aim = centre + (centre - start) * rng.uniform(0.2, 0.8) + np.array([rng.uniform(-1, 1), 0, rng.uniform(
        -1, 1)])
    aim[1] = rng.uniform(0.2, 1.5)
    speed, turn = rng.uniform(0.02, 0.05), rng.uniform(-0.4, 0.4)
    if pace != 1.0:
        speed, turn = speed * pace, turn * pace
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


# Kinds of motion of a clip: camera pace (a factor of the default path's speed and turn) and whether some
# furniture moves. "camera" is the original generator (its draws are unchanged).
MOTIONS: dict[str, tuple[float, bool]] = {
    "camera": (1.0, False),
    "slow_camera": (0.25, False),
    "static_camera": (0.0, True),
}


def sample_scene(rng: np.random.Generator, length: int = 1) -> tuple[Scene, list[Camera]]:
    """A furnished room and ``length`` camera poses moving smoothly through it (free of furniture)."""
    scene, cameras, _ = sample_clip(rng, length, "camera")
    return scene, cameras


def sample_clip(rng: np.random.Generator, length: int, motion: str) -> tuple[Scene, list[Camera], list[Scene]]:
    """A furnished room, ``length`` camera poses and the room at each pose (objects may move): ``motion``
    is a key of :data:`MOTIONS`. With ``"camera"`` the draws are those of :func:`sample_scene`."""
    pace, objects_move = MOTIONS[motion]
    scene = _sample_room(rng)
    cameras = _sample_path(rng, scene.size, length, pace)
    _furnish(scene, rng, _Floor(scene.size, cameras))
    scenes = _move_objects(scene, rng, length) if objects_move else [scene] * length
    return scene, cameras, scenes


_MOVABLE = frozenset(_CLS[name] for name in ("chair", "box", "stool", "ball"))


def _on_floor(primitive: Primitive) -> bool:
    if isinstance(primitive, Cylinder):
        return primitive.bottom < 0.01
    half = primitive.half[1] if isinstance(primitive, Box) else primitive.radius
    return bool(primitive.centre[1] - half < 0.01)


def _shifted(primitive: Primitive, offset: np.ndarray) -> Primitive:
    """``primitive`` moved by ``offset`` (x, z) on the floor."""
    if isinstance(primitive, Cylinder):
        return replace(primitive, x=primitive.x + offset[0], z=primitive.z + offset[1])
    return replace(primitive, centre=primitive.centre + np.array([offset[0], 0.0, offset[1]]))


def _move_objects(scene: Scene, rng: np.random.Generator, length: int) -> list[Scene]:
    """The room at each of ``length`` frames with two to four objects standing on the floor (chairs, boxes,
    stools, balls) sliding on it, 3-8 cm per frame, each its own way (collisions are ignored)."""
    standing = {p.instance for p in scene.primitives if _on_floor(p)}  # not what lies on a table
    movable = [inst for inst, cls in enumerate(scene.classes) if cls in _MOVABLE and inst in standing]
    chosen = rng.permutation(movable)[: int(rng.integers(2, 5))] if movable else []
    velocity = {}
    for inst in chosen:
        angle, speed = rng.uniform(0, 2 * np.pi), rng.uniform(0.03, 0.08)
        velocity[int(inst)] = speed * np.array([np.cos(angle), np.sin(angle)])
    return [
        replace(scene, primitives=[_shifted(p, velocity[p.instance] * step) if p.instance in velocity else p
                                   for p in scene.primitives])
        for step in range(length)
    ]
