"""The shapes rooms are built from (boxes, vertical cylinders, spheres) and the pinhole camera.

World frame: y up. Each primitive answers two questions of the ray caster: where a bundle of rays
first hits it (:meth:`hit`, inf on a miss) and its outward normal at given surface points
(:meth:`normal`); :meth:`corners` bounds it, so the caster only tests the rays of its projected window.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

_CUBE = np.array([[x, y, z] for x in (-1, 1) for y in (-1, 1) for z in (-1, 1)], np.float64)  # corners


def yaw_matrix(yaw: float) -> np.ndarray:
    """Rotation by ``yaw`` about the vertical axis (local +z turns towards world +x)."""
    cos, sin = np.cos(yaw), np.sin(yaw)
    return np.array([[cos, 0.0, sin], [0.0, 1.0, 0.0], [-sin, 0.0, cos]])


def rotate(yaw: float, local: np.ndarray) -> np.ndarray:
    """Local (x, y, z) offsets (3 or 3 x K) -> world offsets for an object turned by ``yaw`` about y."""
    return yaw_matrix(yaw).astype(local.dtype) @ local


@dataclass(frozen=True)
class Box:
    """A box turned by ``yaw`` about the vertical axis."""

    centre: np.ndarray
    half: np.ndarray
    yaw: float
    instance: int

    def _to_local(self, offset: np.ndarray) -> np.ndarray:
        return yaw_matrix(self.yaw).T.astype(offset.dtype) @ offset

    def corners(self) -> np.ndarray:
        return self.centre + rotate(self.yaw, (_CUBE * self.half).T).T

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
        return rotate(self.yaw, local_normal)


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
