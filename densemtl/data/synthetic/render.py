"""The ray caster: one view of a scene as an image and exact labels.

All pixels' rays are intersected with all primitives at once in numpy (each primitive only with the
rays of its projected window), shaded by a point light plus ambient light (Lambertian, no shadows)
over procedural textures, and labelled from the same hits: class, z-depth, camera-frame normals,
boundaries and saliency.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any

import numpy as np

from densemtl.data.synthetic.geometry import Camera
from densemtl.data.synthetic.scene import SALIENT_CLASSES, Scene

FOCAL_AT_640 = 518.8  # the Kinect focal length of NYUD-v2, scaled to the rendered width
# Depth step (relative to the nearer depth) between two different primitives that counts as an occlusion.
DEPTH_JUMP = 0.05


@lru_cache(maxsize=8)
def _camera_rays(height: int, width: int) -> np.ndarray:
    """Ray directions in the camera frame (right, up, forward), forward component 1, shape 3 x H*W."""
    focal = FOCAL_AT_640 * width / 640.0
    cols = (np.arange(width, dtype=np.float32) + 0.5 - width / 2) / focal
    rows = -(np.arange(height, dtype=np.float32) + 0.5 - height / 2) / focal
    grid_x, grid_y = np.meshgrid(cols, rows)
    return np.stack([grid_x.ravel(), grid_y.ravel(), np.ones(height * width, np.float32)])



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

